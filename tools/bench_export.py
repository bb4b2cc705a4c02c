#!/usr/bin/env python3
"""Benchmark of ``kvmtrace export --parquet`` on every core (``-j N``) against one thread and
against decoding alone, side by side in one run.

    .venv/bin/python tools/bench_export.py [--events N] [--vcpus V] [--rounds R] [--jobs N]

The recording is the workload-like stream of tools/bench_parallel.py
(:func:`kvmtrace.testing.synth.write_workload_recording`). Each round runs, in turn:

  decode       the recording's event batches, nothing else (what export reads)
  export 1     export_parquet(..., jobs=1): read, build and write in one thread
  export N     the same with jobs=N: row groups built and written by other threads while
               the input is read (the file is byte for byte the same; checked each round)

and prints events/s and the ratios export N / export 1 and export N / decode, per round,
then the median and the spread (min..max). Wall time; CPU seconds too (the threads' work
needs idle cores). Prints figures; asserts nothing.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import parser

from kvmtrace.source.recording import open_recording
from kvmtrace.testing.synth import write_workload_recording
from kvmtrace.views.parquet import export_parquet


def timed(fn) -> tuple[float, float]:
    """(wall s, CPU s of this process) of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def decode(path: Path) -> None:
    for _ in open_recording(path).batches():
        pass


def main() -> int:
    ap = parser(__doc__, rounds=5)
    ap.add_argument("--events", type=int, default=8_000_000)
    ap.add_argument("--vcpus", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.kvt"
        write_workload_recording(path, args.events, args.vcpus)
        outs = {j: Path(tmp) / f"out{j}.parquet" for j in (1, args.jobs)}
        print(f"{args.events} events, {args.vcpus} vCPUs; export -j {args.jobs} vs -j 1 "
              "vs decode alone, wall s (CPU s)")
        ratios: dict[str, list[float]] = {"cores": [], "decode": []}
        for r in range(args.rounds):
            got = {"decode": timed(lambda: decode(path))}
            for j, out in outs.items():
                out.unlink(missing_ok=True)
                got[f"export {j}"] = timed(lambda j=j, out=out: export_parquet(
                    open_recording(path), out, jobs=j))
            same = outs[1].read_bytes() == outs[args.jobs].read_bytes()
            one, many, dec = (got["export 1"][0], got[f"export {args.jobs}"][0],
                              got["decode"][0])
            ratios["cores"].append(one / many)
            ratios["decode"].append(dec / many)
            print(f"round {r + 1}: " + "  ".join(f"{k} {w:.2f} s ({c:.2f})"
                                                  for k, (w, c) in got.items())
                  + f"  -j {args.jobs}/-j 1 {one / many:.2f}, /decode {dec / many:.2f}"
                  + ("" if same else "  FILES DIFFER"), flush=True)
        for name, label in (("cores", f"export -j {args.jobs} / export -j 1"),
                            ("decode", f"export -j {args.jobs} / decode (speed)")):
            v = ratios[name]
            print(f"{label}: median {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f}) "
                  f"over {len(v)} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
