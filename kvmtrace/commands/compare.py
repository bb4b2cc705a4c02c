"""``kvmtrace compare BASE NEW``: did a kernel or VMM change make the dirty ring slower?

Profiles both traces (recording, tracefs text or ``perf script`` text, detected) with
:func:`kvmtrace.analysis.profile.profile_source`, compares them with
:func:`kvmtrace.analysis.comparison.compare_profiles` and prints an 80-column table
(:mod:`kvmtrace.views.compare_text`) or one JSON object. Exit status: 0 no regression,
1 a regression found, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

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

__all__ = ["register", "run"]

EPILOG = """examples:
  kvmtrace compare before.kvt after.kvt          # two recordings of the same workload
  kvmtrace compare old.txt new.txt --ring-bytes 4096   # tracefs or perf script text
  kvmtrace compare before.kvt after.kvt --threshold 5 --json | jq '.metrics[]'
  kvmtrace compare before.kvt after.kvt --html report.html   # plots, for a browser

a verdict needs a change beyond the threshold and, for stall and reset-latency
percentiles, a bootstrap interval of the difference that excludes zero.
exit status: 0 no regression, 1 a regression found, 2 bad input
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "compare",
        help="compare two traces: dirty rate, stalls, reset latency; flag regressions",
        description="Compare a BASE and a NEW trace of the same workload (recordings, "
        "tracefs or perf\nscript text) per ring index: push rate, soft-full exits per 10k "
        "pushes, entries\nper reset, max used, overwritten entries, and exact stall and "
        "reset-latency\npercentiles, each with base, new, change and a verdict.",
        epilog=EPILOG, run=run,
    )
    add_input(p, "the trace before the change", "base")
    add_input(p, "the trace after the change", "new")
    p.add_argument("--threshold", type=float, default=10.0, metavar="PCT",
                   help="smallest change in percent that gets a verdict (default 10)")
    add_json(p)
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report "
                   "(distribution plots, per-ring time series, the verdicts) to FILE")
    add_ring_size(p, "ring size in entries where a trace does not say (both traces)",
                  "ring size in bytes (as given to KVM_ENABLE_CAP); or --ring-entries")
    add_progress(p)
    add_skip_damaged(p)
    add_jobs(p, "read the two traces in N >= 2 processes at once (1: one after the other; "
                "default: at once when both are 8 MiB or more and 2 CPUs are free to use)")


#: inputs this large (the smaller of the two) are read in two processes by default
TWO_PROCESSES_BYTES = 8 << 20


def _two_processes(args: argparse.Namespace) -> bool:
    """Read the inputs in two processes: ``-j`` of 2 or more, or by default when both are
    large and two CPUs are free to use."""
    jobs, min_events = jobs_of(args)
    if jobs < 2:
        return False
    if min_events == 0:  # -j given
        return True
    try:
        return min(os.path.getsize(args.base), os.path.getsize(args.new)) >= \
            TWO_PROCESSES_BYTES
    except OSError:  # not there: the error comes from opening it
        return False


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.threshold) or not 0 <= args.threshold < 1e6:
        raise UsageError(f"--threshold {args.threshold}: not a percentage",
                         "give a number from 0 up, e.g. --threshold 10")
    from ..analysis.comparison import compare_profiles
    from ..analysis.profile import profile_source
    from ..analysis.replay.parallel import Forked
    from ..source.detect import open_source
    from ..views.progress import Progress, events_total, track

    if args.html:  # refused (exit 2) before any trace is read
        from ..views.report_html import check_report

        check_report(args.html, [args.base, args.new])

    def profile(path: str, bar_on: bool) -> tuple[Any, list[str], bool]:
        src = open_source(path, ring_entries=args.ring_entries, ring_bytes=args.ring_bytes,
                          skip_damaged=args.skip_damaged)
        try:
            with Progress(f"compare {'base' if path is args.base else 'new'}",
                          events_total(src), enabled=bar_on) as bar:
                prof = profile_source(track(src, bar))
        except ValueError as err:  # a malformed block or line the source could not read
            raise UsageError(f"{path}: {err}", "check the file is complete") from None
        return prof, list(src.warnings), src.truncated

    # NEW read in a second process while this one reads BASE (-j 1: one after the other)
    # (a forked reader draws no bar: two bars on one terminal would garble)
    later = Forked(lambda: profile(args.new, False)) if _two_processes(args) else None
    profiles = []
    try:
        for path in (args.base, args.new):
            prof, warnings, truncated = (later.result() if later is not None and
                                         path is args.new else profile(path, args.progress))
            profiles.append(prof)
            for w in warnings:  # text whose rings were not all told apart; damage skipped
                named = w if w.startswith(f"{path}: ") else f"{path}: {w}"
                print(f"kvmtrace compare: warning: {named}", file=sys.stderr)
            if truncated:
                print(f"kvmtrace compare: warning: {path} ends early (writer killed?); "
                      "compared what it holds", file=sys.stderr)
    finally:
        if later is not None:
            later.cancel()
    cmp = compare_profiles(*profiles, base_path=args.base, new_path=args.new,
                           threshold_pct=args.threshold)
    if args.json:
        print(json.dumps(cmp.to_dict(), allow_nan=False))
    else:
        from ..views.compare_text import render_text

        print(render_text(cmp))
    if args.html:
        from ..views.compare_text import render_text
        from ..views.report_html import report_paths  # matplotlib only imported here

        report_paths(args.html, [args.base], [args.new], verdicts=render_text(cmp),
                     ring_entries=args.ring_entries, ring_bytes=args.ring_bytes)
    return cmp.exit_status
