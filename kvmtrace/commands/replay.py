"""``kvmtrace replay FILE``: rebuild every dirty ring of a trace through the ring model.

Reads a kvmtrace recording, tracefs text or ``perf script`` text (detected), replays it
with :func:`kvmtrace.analysis.replay.replay_source` and prints the text report
(:mod:`kvmtrace.views.replay_text`) or one JSON object (:mod:`kvmtrace.views.replay_json`).
Exit status: 0 clean, 1 anomalies found or lost events (the tracer dropped some), 2 bad
input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..core.events import Kind
from ..core.kvm_abi import KVM_DIRTY_RING_RSVD_ENTRIES, RSVD_ENTRIES_PML, valid_entries
from ..errors import UsageError
from ..host.outfile import atomic_output, check_output
from ..model.results import Durations
from .args import (
    add_input,
    add_jobs,
    add_json,
    add_progress,
    add_ring_size,
    add_skip_damaged,
    add_subcommand,
    integer,
    jobs_of,
    number,
)

if TYPE_CHECKING:
    from ..analysis.migration import ExtrasTap

__all__ = ["register", "run", "ReplayOptions", "replay_options"]

EPILOG = """examples:
  kvmtrace replay run.kvt                       # a recording of 'kvmtrace record'
  kvmtrace replay trace.txt --ring-bytes 8192   # tracefs text; the ring size it lacks
  perf script > perf.txt && kvmtrace replay perf.txt --json | jq .anomalies
  kvmtrace replay run.kvt --simulate-ring-entries 1024   # exits with a smaller ring?
  kvmtrace replay run.kvt --dump-harvest harvest.json    # every harvested (slot, offset)
  kvmtrace replay run.kvt --hist                # log2 histograms of stall and reset time
  kvmtrace replay big.kvt -j 1                  # one process (default: every CPU)
  kvmtrace replay damaged.kvt --skip-damaged    # replay the sound blocks, count the rest

exit status: 0 clean, 1 anomalies found (or lost events), 2 bad input
"""

MIN_WINDOW_S = 1e-3  #: the shortest --window: 1 ms


def register(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "replay",
        help="cross-check a trace against the dirty-ring model; find lost pages",
        description="Replay a recording (kvmtrace record), tracefs text or perf script "
        "output\nthrough a model of struct kvm_dirty_ring: anomalies (overflow, pushes past "
        "the\nsoft limit, lost events, bad indices, livelock), per-ring totals, stalls, a\n"
        "digest of the harvested entries, dirty rate and working set per vCPU.",
        epilog=EPILOG, run=run,
    )
    add_input(p, "recording, tracefs trace text or perf script text")
    add_json(p)
    add_ring_size(p, "ring size in entries where the trace does not say",
                  "ring size in bytes (as given to KVM_ENABLE_CAP); or --ring-entries")
    add_skip_damaged(p)
    p.add_argument("--simulate-ring-entries", type=int, metavar="N",
                   help="also report the soft-full exits a ring of N entries would cause")
    p.add_argument("--dump-harvest", metavar="OUT",
                   help="write every harvested [slot, offset] per ring to OUT (JSON)")
    p.add_argument("--window", type=number("--window", MIN_WINDOW_S, 1e6, example="0.1"),
                   default=1.0, metavar="SECS",
                   help="working-set window in seconds (default 1)")
    p.add_argument("--top", type=integer("--top", 1, 1 << 20, example="10"), default=10,
                   metavar="N",
                   help="hottest pages to list per VM (default 10)")
    p.add_argument("--reserved", type=int, default=KVM_DIRTY_RING_RSVD_ENTRIES,
                   metavar="64|576",
                   help="entries KVM keeps back: 64, or 576 on Intel hosts with PML")
    p.add_argument("--hist", action="store_true",
                   help="end the text report with log2 histograms (bcc style) of stall "
                        "time and KVM_RESET_DIRTY_RINGS latency")
    add_progress(p)
    add_jobs(p)


@dataclass(frozen=True)
class ReplayOptions:
    """What the replay engine is asked to do, checked: the keywords of
    :class:`kvmtrace.analysis.replay.Replay`."""

    reserved: int  # entries KVM keeps back: 64, or 576 with Intel PML
    keep_harvest: bool  # keep every harvested (slot, offset) for --dump-harvest
    window_ns: int  # working-set window, ns
    simulate_entries: int | None  # also simulate a ring of this many entries


def replay_options(args: argparse.Namespace) -> ReplayOptions:
    """The engine's options from the command line; UsageError (one line) on a bad value."""
    _check(args)
    return ReplayOptions(reserved=args.reserved, keep_harvest=bool(args.dump_harvest),
                         window_ns=max(1, int(args.window * 1e9)),
                         simulate_entries=args.simulate_ring_entries)


def _check(args: argparse.Namespace) -> None:
    if args.reserved not in (KVM_DIRTY_RING_RSVD_ENTRIES, RSVD_ENTRIES_PML):
        raise UsageError(f"--reserved {args.reserved}: KVM keeps back 64 entries, or 576 "
                         "with Intel PML", "give --reserved 64 or --reserved 576")
    if not MIN_WINDOW_S <= args.window <= 1e6:  # NaN fails too
        raise UsageError(f"--window {args.window}: not 1 ms to 1e6 seconds",
                         "e.g. --window 0.1")
    if args.top < 1:
        raise UsageError(f"--top {args.top}: must be at least 1", "e.g. --top 10")
    n = args.simulate_ring_entries
    if n is not None and (not valid_entries(n) or n <= args.reserved):
        raise UsageError(f"--simulate-ring-entries {n} is not a ring KVM accepts",
                         f"give a power of two from 256 to 65536 above the reserve "
                         f"{args.reserved}, e.g. 1024")
    if args.hist and args.json:
        raise UsageError("--hist draws text histograms; --json prints none",
                         "drop one: the JSON has exact stall and reset-latency percentiles")
    if args.dump_harvest:  # refused before anything is read or written
        check_output(args.dump_harvest, [args.file], flag="--dump-harvest")


def _reset_latency(tap: ExtrasTap) -> Durations:
    """The KVM_RESET_DIRTY_RINGS durations (Kind.RESET_LAT values, ns) the replay's tap kept
    (it keeps every event but pushes)."""
    out = Durations()
    for ev in tap.rest:
        out.add_many(ev["value"][ev["kind"] == Kind.RESET_LAT])
    return out


def run(args: argparse.Namespace) -> int:
    opts = replay_options(args)
    from ..analysis.migration import ExtrasTap, replay_extras
    from ..analysis.replay import replay_source
    from ..source.detect import open_source
    from ..views.progress import Progress, events_total, track

    src = open_source(args.file, ring_entries=args.ring_entries, ring_bytes=args.ring_bytes,
                      skip_damaged=args.skip_damaged)
    try:
        tap = ExtrasTap()
        jobs, min_events = jobs_of(args)
        if args.skip_damaged:  # what each process skipped is known to it alone: one process
            jobs = 1
        with Progress("replay", events_total(src), enabled=args.progress) as bar:
            report = replay_source(track(src, bar), tap, jobs=jobs, min_events=min_events,
                                   on_block=bar.update if bar.active else None,
                                   **asdict(opts))
    except ValueError as err:  # a malformed block or line the source could not read
        raise UsageError(f"{args.file}: {err}", "check the file is complete") from None
    truncated = src.truncated
    warnings = list(src.warnings)  # text traces: rings not told apart; damage skipped
    unsure = src.unsure
    if unsure:  # a reset these rings share could be either's: claim nothing from it
        report.anomalies = [a for a in report.anomalies if a.ring not in unsure]
    for w in warnings:
        print(f"kvmtrace replay: warning: {w}", file=sys.stderr)
    if args.dump_harvest:
        from ..views.replay_json import harvest_dump

        with atomic_output(args.dump_harvest, inputs=[args.file], flag="--dump-harvest",
                           text=True) as out:
            json.dump(harvest_dump(report), out.file)
            out.file.write("\n")
    migrations, splits = replay_extras(lambda: open_source(
        args.file, ring_entries=args.ring_entries, ring_bytes=args.ring_bytes,
        skip_damaged=args.skip_damaged), tap)
    if args.json:
        from ..views.replay_json import dumps_report

        print(dumps_report(report, file=args.file, top=args.top, truncated=truncated,
                           warnings=warnings, migrations=migrations, stall_splits=splits,
                           reset_latency=_reset_latency(tap)))
    else:
        from ..views.replay_text import render_text

        print(render_text(report, file=args.file, top=args.top, truncated=truncated,
                          warnings=warnings, migrations=migrations, stall_splits=splits,
                          histograms=args.hist,
                          reset_latency=_reset_latency(tap) if args.hist else None))
    if truncated:
        print(f"kvmtrace replay: warning: {args.file} ends early (writer killed?); "
              "replayed what it holds", file=sys.stderr)
    return report.exit_status
