"""``kvmtrace export FILE --parquet OUT | --perfetto OUT``: a recording (or imported trace
text) to Parquet for SQL/dataframe tools, or to a Perfetto/Chrome JSON timeline.

OUT is written atomically (:mod:`kvmtrace.host.outfile`): created 0600 beside OUT and
renamed into place when complete; OUT that is the input, a symlink or a directory is
refused with exit 2 before anything is written."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import UsageError
from ..host.outfile import check_output
from .args import (
    MAX_SECONDS,
    add_input,
    add_jobs,
    add_progress,
    add_ring_size,
    add_skip_damaged,
    add_subcommand,
)

__all__ = ["register", "run", "open_input"]

MAX_ROW_GROUP_ROWS = 1 << 26  #: larger row groups only cost memory

EPILOG = """examples:
  kvmtrace export run.kvt --parquet run.parquet
      duckdb -c "SELECT ring, count(*) FROM 'run*.parquet' WHERE kind = 'push' GROUP BY ring"
  kvmtrace export run.kvt --perfetto run.json     # open in https://ui.perfetto.dev
  kvmtrace export damaged.kvt --skip-damaged --parquet sound.parquet
  kvmtrace export big.kvt --parquet big.parquet -j 1   # one thread (default: idle CPUs)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "export",
        help="convert a recording to Parquet or a Perfetto timeline",
        description="Convert a recording (or imported ftrace / perf script text) to Parquet,\n"
        "one row per event, for DuckDB, Polars or Spark; or to a Chrome JSON timeline\n"
        "for the Perfetto UI: per-vCPU ring occupancy counters, soft-full stall slices,\n"
        "resets.",
        epilog=EPILOG, run=run,
    )
    add_input(p, "a recording (kvmtrace record), ftrace or perf script text")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--parquet", metavar="OUT", help="write one row per event to OUT")
    out.add_argument("--perfetto", metavar="OUT",
                     help="write a Chrome JSON trace (Perfetto UI) to OUT")
    add_ring_size(p, "ring size in entries when the input does not say (text imports)")
    add_skip_damaged(p)
    p.add_argument("--counter-interval-us", type=float, default=100.0, metavar="US",
                   help="Perfetto: at most one 'used' sample per ring per US µs, besides the "
                        "samples around resets (0 = every event; default 100)")
    p.add_argument("--row-group-rows", type=int, default=1 << 20, metavar="N",
                   help="Parquet: rows per row group (default 1048576)")
    add_jobs(p, help="Parquet: build and write row groups on N cores while the input is "
                     "read (1: all in one thread; default: the CPUs this process may use "
                     "that are idle now); the file is the same either way")
    add_progress(p)


def open_input(path: str, ring_entries: int | None, skip_damaged: bool = False) -> Any:
    """The EventSource for ``path``: kvmtrace.source.detect when present, else a recording.
    ``skip_damaged``: a recording's damaged blocks are skipped and counted."""
    try:
        from ..source.detect import open_source
    except ImportError:
        from ..source.recording import open_recording

        src = open_recording(path, skip_damaged=skip_damaged)
        if ring_entries:
            src.meta.ring_entries.setdefault((-1, -1), ring_entries)
        return src
    return open_source(path, ring_entries=ring_entries, skip_damaged=skip_damaged)


def run(args: argparse.Namespace) -> int:
    if args.ring_entries is not None and args.ring_entries <= 0:
        raise UsageError(f"--ring-entries {args.ring_entries}: must be positive")
    if not 0 <= args.counter_interval_us <= MAX_SECONDS * 1e6:  # NaN fails both
        raise UsageError(f"--counter-interval-us {args.counter_interval_us}: not a number of "
                         "microseconds", "give 0 or more, e.g. --counter-interval-us 100")
    if not 0 < args.row_group_rows <= MAX_ROW_GROUP_ROWS:
        raise UsageError(f"--row-group-rows {args.row_group_rows}: not 1 to "
                         f"{MAX_ROW_GROUP_ROWS}", "e.g. --row-group-rows 1048576")
    flag, dest = ("--parquet", args.parquet) if args.parquet else ("--perfetto", args.perfetto)
    check_output(dest, [args.file], flag=flag)  # before anything is read or written
    src = open_input(args.file, args.ring_entries, args.skip_damaged)
    from ..views.progress import Progress, events_total, track

    total = events_total(src)
    bar = Progress("export", total, enabled=args.progress)
    if args.parquet:
        from ..views.parquet import export_parquet

        if args.jobs is not None:
            jobs = args.jobs
        elif total is not None and total <= args.row_group_rows:
            jobs = 1  # one row group: nothing to overlap, no CPU sample
        else:
            from ..analysis.replay.parallel import default_jobs

            jobs = default_jobs()
        with bar:
            rows = export_parquet(track(src, bar), args.parquet,
                                  row_group_rows=args.row_group_rows, jobs=jobs)
        print(f"kvmtrace export: {rows} events -> {args.parquet}", file=sys.stderr)
    else:
        from ..analysis.migration import migrations_of
        from ..views.perfetto import export_perfetto

        migrations = migrations_of(
            lambda: open_input(args.file, args.ring_entries, args.skip_damaged))
        with bar:
            n = export_perfetto(track(src, bar), args.perfetto,
                                counter_interval_ns=int(args.counter_interval_us * 1000),
                                migrations=migrations)
        print(f"kvmtrace export: {n} trace events -> {args.perfetto}", file=sys.stderr)
    for w in src.warnings:  # text rings not told apart; data after END; damage skipped
        print(f"kvmtrace export: warning: {w}", file=sys.stderr)
    if src.truncated:
        print(f"kvmtrace export: warning: {args.file} ends early (writer killed?); exported "
              "what it holds", file=sys.stderr)
    return 0
