#!/usr/bin/env python3
"""Long fuzz run of every reader (issue 10, item 3).

    .venv/bin/python tools/fuzz_readers.py [--cases N] [--reader NAME ...] [--keep DIR]

Per reader (recording, recording-skip: the same with --skip-damaged, ftrace,
perf-script), N hostile variants of real inputs
(tests/fuzzing.py: structured mutations of recordings, line mutations of tracefs and perf
script text) each run through one of replay, replay --json, top -b --replay and export
in a worker process capped at 3 GiB of address space, 20 s per case. The property: exit
0/1 (a replay of what is sound, what was skipped said) or exit 2 with one line; never a
traceback, a hang or a blow-up. Prints, per reader, the cases run, their exit statuses and
the problems found; then the worst time of a case and the worker's peak RSS. Failing
inputs are kept in --keep DIR (default: a temporary directory, printed). Exit status 0
when no case broke the property.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT  # noqa: F401  (puts tests/ and the checkout on sys.path)
from fuzzing import READERS, Tally, Worker, argv_for, case_path, case_strategy
from hypothesis import HealthCheck, given, settings


def fuzz(reader: str, cases: int, worker: Worker, tally: Tally, work: Path,
         keep: Path) -> None:
    path, out = case_path(reader, work), work / f"{reader}.parquet"

    @settings(max_examples=cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=["generate"])
    @given(case_strategy(reader))
    def one(case: tuple[bytes, str]) -> None:
        data, command = case
        path.write_bytes(data)
        argv = argv_for(command, path, out)
        bad = tally.add(reader, argv, worker.run(argv), data)
        done = tally.cases[reader]
        if done % 1000 == 0:
            print(f"  {reader}: {done} cases, {len(tally.problems)} problems", flush=True)
        if bad:
            n = len(tally.problems)
            (keep / f"{reader}-{n}.in").write_bytes(data)
            print(f"  {reader} case {tally.cases[reader]}: {' '.join(argv[:-1])}: "
                  f"{bad.splitlines()[-1][:200]} (kept as {reader}-{n}.in)", flush=True)

    one()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--cases", type=int, default=10_000, help="cases per reader (10000)")
    p.add_argument("--reader", action="append", choices=READERS, help="only these readers")
    p.add_argument("--keep", type=Path, help="directory for failing inputs")
    args = p.parse_args()
    if args.cases < 1:
        p.error("--cases must be at least 1")
    keep = args.keep or Path(tempfile.mkdtemp(prefix="kvmtrace-fuzz-"))
    keep.mkdir(parents=True, exist_ok=True)
    tally, worker = Tally(), Worker()
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as work:
            for reader in args.reader or READERS:
                r0 = time.monotonic()
                fuzz(reader, args.cases, worker, tally, Path(work), keep)
                ex = " ".join(f"exit {k}: {v}" for k, v in sorted(tally.exits[reader].items()))
                bad = sum(1 for x in tally.problems if x[0] == reader)
                print(f"{reader:12} {tally.cases[reader]:6} cases  {ex}  problems {bad}  "
                      f"({time.monotonic() - r0:.0f} s)", flush=True)
    finally:
        worker.close()
    print(f"worst case {tally.worst_secs:.2f} s; worker peak RSS "
          f"{worker.peak_rss_kib / 1024:.0f} MiB (cap 3 GiB of address space); "
          f"total {time.monotonic() - t0:.0f} s; failing inputs in {keep}")
    return 1 if tally.problems else 0


if __name__ == "__main__":
    sys.exit(main())
