"""``kvmtrace compare BASE NEW``: did a kernel or VMM change make the dirty ring slower?

Each side is a trace (recording, tracefs or ``perf script`` text, detected) or a bundle of
repetitions written by ``kvmtrace bench`` (a directory); :func:`resolve` turns each into a
:class:`~kvmtrace.analysis.bundle.Bundle` (a list of trace paths and the bundle's
metadata), the seam every view of a comparison starts from.

- One trace on each side: :func:`kvmtrace.analysis.comparison.compare_profiles`, per ring
  index, percentiles judged with a bootstrap of the two traces' own values (JSON schema 1).
- More runs on a side: :func:`kvmtrace.analysis.rep_comparison.compare_reps`, per metric
  the change of the mean over runs with a Welch t-interval (JSON schema 2).

Both add the ring anomalies (overflowed or stuck rings): in NEW only, a regression.
Output: an 80-column table (:mod:`kvmtrace.views.compare_text`) or one JSON object;
``--html FILE`` also writes a self-contained report (:mod:`kvmtrace.views.report_html`).
``-j 2`` (by default for large inputs) reads NEW in a second process while this one reads
BASE.
Exit status: 0 no regression, 1 a regression found, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from ..analysis.bundle import Bundle, RepMetrics, load_side, measure
from ..analysis.comparison import Thresholds, metric_key
from ..analysis.profile import Profile
from ..errors import UsageError
from .args import (
    add_input,
    add_jobs,
    add_json,
    add_progress,
    add_ring_size,
    add_skip_damaged,
    add_subcommand,
    jobs_of,
)

__all__ = ["register", "run", "resolve", "parse_thresholds", "measure_side",
           "scenario_warning", "METRIC_GROUPS", "METRIC_KEYS"]

EPILOG = """examples:
  kvmtrace compare before.kvt after.kvt          # two recordings of the same workload
  kvmtrace compare old.txt new.txt --ring-bytes 4096   # tracefs or perf script text
  kvmtrace compare before.kvt after.kvt --threshold 5 --json | jq '.metrics[]'
  kvmtrace compare kernelA/ kernelB/             # two kvmtrace bench bundles
  kvmtrace compare kernelA/ kernelB/ --threshold stall_p50=5% --threshold 20
  kvmtrace compare kernelA/ kernelB/ --html report.html   # plots, one self-contained file

two traces: a verdict needs a change beyond the threshold and, for stall and
reset-latency percentiles, a bootstrap interval of the difference that excludes zero.
bundles: a verdict needs the whole Welch t-interval of the change of the mean over runs
beyond the threshold (99.4% each: 95% for all nine verdicts together, Bonferroni).
A ring that overflowed or got stuck in NEW but in no BASE run is a regression by itself.
exit status: 0 no regression, 1 a regression found, 2 bad input
"""

#: metric keys --threshold KEY=PCT accepts; the keys of one group name one metric (two
#: traces are compared per ring, bundles per run: their rows are named a little apart)
METRIC_GROUPS = (
    ("push_rate", "push_rate_per_vcpu"), ("dirty_mbps", "dirty_mb_s"),
    ("soft_full_exits_10k", "soft_full_per_1k", "soft_full_1k_pushes"),
    ("entries_per_reset",), ("max_used",), ("overwritten",), ("lost_events",),
    ("stall_p50",), ("stall_p90",), ("stall_p99",),
    ("reset_latency_p50", "reset_lat_p50"), ("reset_latency_p90", "reset_lat_p90"),
    ("reset_latency_p99", "reset_lat_p99"),
)
METRIC_KEYS = tuple(k for group in METRIC_GROUPS for k in group)

#: inputs this large (the smaller side, in bytes) are read in two processes by default
TWO_PROCESSES_BYTES = 8 << 20


def register(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "compare",
        help="compare two traces or bench bundles: dirty rate, stalls, reset latency; "
        "flag regressions",
        description="Compare a BASE and a NEW trace of the same workload (recordings, "
        "tracefs or perf\nscript text) per ring index: push rate, soft-full exits per 10k "
        "pushes, entries\nper reset, max used, overwritten entries, and exact stall and "
        "reset-latency\npercentiles, each with base, new, change and a verdict. BASE and "
        "NEW may be\nbundles of runs (kvmtrace bench -o DIR): then each metric's change "
        "of the mean\nover runs gets a confidence interval.",
        epilog=EPILOG, run=run,
    )
    add_input(p, "the trace or bench bundle before the change", "base")
    add_input(p, "the trace or bench bundle after the change", "new")
    p.add_argument("--threshold", action="append", default=[], metavar="[METRIC=]PCT",
                   help="smallest change in percent that gets a verdict (default 10); "
                   "METRIC=PCT for one metric, e.g. stall_p50=5%% (repeatable)")
    add_json(p, "print one JSON object (schema 1: two traces; schema 2: bundles)")
    add_ring_size(p, "ring size in entries where a trace does not say (both traces)",
                  "ring size in bytes (as given to KVM_ENABLE_CAP); or --ring-entries")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report "
                   "(distribution plots, per-ring time series, the verdicts) to FILE")
    add_progress(p)
    add_skip_damaged(p)
    add_jobs(p, "read the two sides in N >= 2 processes at once (1: one after the other; "
                "default: at once when both are 8 MiB or more and 2 CPUs are free to use)")


def _two_processes(args: argparse.Namespace, base: Bundle, new: Bundle) -> bool:
    """Read the sides in two processes: ``-j`` of 2 or more, or by default when both are
    large and two CPUs are free to use."""
    jobs, _min_events = jobs_of(args)
    if jobs is not None:  # -j given
        return jobs >= 2
    try:
        sizes = [sum(os.path.getsize(p) for p in side.recordings) for side in (base, new)]
    except OSError:  # not there: the error comes from opening it
        return False
    if min(sizes) < TWO_PROCESSES_BYTES:
        return False
    from ..analysis.replay.parallel import default_jobs

    return default_jobs() >= 2


def _pct(text: str, flag: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value < 1e6:
        raise UsageError(f"--threshold {flag}: not a percentage",
                         "give a number from 0 up, e.g. --threshold 10 or stall_p50=5%")
    return value


def parse_thresholds(items: list[str]) -> Thresholds:
    """``--threshold`` values: ``PCT`` (the default, last one wins) or ``METRIC=PCT``."""
    default = 10.0
    per: dict[str, float] = {}
    for item in items:
        if "=" not in item:
            default = _pct(item, item)
            continue
        name, _, pct = item.partition("=")
        key = metric_key(name)
        group = next((g for g in METRIC_GROUPS if key in g), None)
        if group is None:
            raise UsageError(f"--threshold {item}: unknown metric {name!r}",
                             "use one of " + ", ".join(g[0] for g in METRIC_GROUPS))
        value = _pct(pct, item)
        per.update(dict.fromkeys(group, value))
    return Thresholds(default, per)


def resolve(args: argparse.Namespace) -> tuple[Bundle, Bundle]:
    """BASE and NEW as bundles (a single trace is a bundle of one)."""
    return load_side(args.base), load_side(args.new)


Measured = list[tuple[Profile | None, RepMetrics]]


def measure_side(side: Bundle, args: argparse.Namespace, *, keep_profiles: bool = True,
                 progress: bool | None = None, label: str = "side"
                 ) -> tuple[Measured, list[str]]:
    """Profile every trace of ``side`` (one pass each) and the warnings to print. Without
    ``keep_profiles`` only the metrics stay (a profile holds every stall of its trace).
    ``progress``: a bar per trace on a terminal (default ``args.progress``), named
    ``compare LABEL`` (and the run's number in a bundle)."""
    from ..source.detect import open_source
    from ..views.progress import Progress, events_total, track

    out: Measured = []
    warnings: list[str] = []
    bar_on = getattr(args, "progress", False) if progress is None else progress
    for i, path in enumerate(side.recordings):
        src = open_source(path, ring_entries=args.ring_entries, ring_bytes=args.ring_bytes,
                          skip_damaged=getattr(args, "skip_damaged", False))
        try:
            name = label if side.reps == 1 else f"{label} {i + 1}/{side.reps}"
            with Progress(f"compare {name}", events_total(src), enabled=bar_on) as bar:
                prof, metrics = measure(track(src, bar), str(path))
            out.append((prof if keep_profiles else None, metrics))
        except ValueError as err:  # a malformed block or line the source could not read
            raise UsageError(f"{path}: {err}", "check the file is complete") from None
        finally:
            src.close()
        for w in src.warnings:  # text whose rings were not all told apart; damage skipped
            named = w if w.startswith(f"{path}: ") else f"{path}: {w}"
            warnings.append(f"kvmtrace compare: warning: {named}")
        if src.truncated:
            warnings.append(f"kvmtrace compare: warning: {path} ends early (writer "
                            "killed?); compared what it holds")
    return out, warnings


def _measure_both(args: argparse.Namespace, base: Bundle, new: Bundle,
                  keep_profiles: bool) -> list[Measured]:
    """Both sides measured, NEW in a second process where :func:`_two_processes` says
    (a forked reader draws no progress bar: two bars on one terminal would garble)."""
    from ..analysis.replay.parallel import Forked

    later = (Forked(lambda: measure_side(new, args, keep_profiles=keep_profiles,
                                         progress=False, label="new"))
             if _two_processes(args, base, new) else None)
    try:
        sides = [measure_side(base, args, keep_profiles=keep_profiles, label="base"),
                 later.result() if later is not None else
                 measure_side(new, args, keep_profiles=keep_profiles, label="new")]
    finally:
        if later is not None:
            later.cancel()
    for _, warnings in sides:
        for line in warnings:
            print(line, file=sys.stderr)
    return [measured for measured, _ in sides]


def _side_json(b: Bundle, reps: list[RepMetrics]) -> dict[str, Any]:
    return {"path": str(b.path), "bundle": b.meta, "runs": len(reps),
            "recordings": [r.to_dict() for r in reps]}


def scenario_warning(base: Bundle, new: Bundle) -> str | None:
    """One line when two bundles ran different scenarios (VMM or workload flags)."""
    if base.meta is None or new.meta is None:
        return None
    a = (base.meta.get("vmm"), base.meta.get("workload_args"))
    b = (new.meta.get("vmm"), new.meta.get("workload_args"))
    if a == b:
        return None
    return (f"kvmtrace compare: warning: the bundles ran different scenarios: base "
            f"{a[0]} {' '.join(a[1] or [])}; new {b[0]} {' '.join(b[1] or [])}")


def run(args: argparse.Namespace) -> int:
    thresholds = parse_thresholds(args.threshold)
    base, new = resolve(args)
    if args.html:  # refused (exit 2) before any trace is read
        from ..views.report_html import check_report

        check_report(args.html, [*base.recordings, *new.recordings])
    warning = scenario_warning(base, new)
    if warning:
        print(warning, file=sys.stderr)
    pair = base.reps == 1 and new.reps == 1  # two traces: compared per ring as such
    measured = _measure_both(args, base, new, pair)
    if pair:
        from ..analysis.comparison import compare_profiles

        (pb, mb), (pn, mn) = measured[0][0], measured[1][0]
        assert pb is not None and pn is not None
        cmp = compare_profiles(pb, pn, base_path=str(base.recordings[0]),
                               new_path=str(new.recordings[0]), thresholds=thresholds,
                               base_anomalies=mb.anomalies, new_anomalies=mn.anomalies)
        from ..views.compare_text import render_text

        text = render_text(cmp)
        print(json.dumps(cmp.to_dict(), allow_nan=False) if args.json else text)
        _report(args, base, new, text)
        return cmp.exit_status
    from ..analysis.rep_comparison import compare_reps

    mbase, mnew = [m for _, m in measured[0]], [m for _, m in measured[1]]
    reps = compare_reps(mbase, mnew, thresholds)
    from ..views.compare_text import render_reps

    text = render_reps(reps, base, new)
    if args.json:
        out = {"schema": reps.to_dict()["schema"], "base": _side_json(base, mbase),
               "new": _side_json(new, mnew), **reps.to_dict()}
        print(json.dumps(out, allow_nan=False))
    else:
        print(text)
    _report(args, base, new, text)
    return reps.exit_status


def _report(args: argparse.Namespace, base: Bundle, new: Bundle, verdicts: str) -> None:
    """``--html FILE``: the report of both sides' traces, the verdicts as text."""
    if not args.html:
        return
    sys.stdout.flush()
    from ..views.report_html import report_paths  # matplotlib only imported here

    report_paths(args.html, base.recordings, new.recordings, verdicts=verdicts,
                 ring_entries=args.ring_entries, ring_bytes=args.ring_bytes,
                 skip_damaged=args.skip_damaged)
