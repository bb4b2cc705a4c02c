#!/usr/bin/env python3
"""What the progress bar costs a replay: paired timings with and without it.

    .venv/bin/python tools/bench_progress.py [--events N] [--pairs K]

Writes a workload-like recording of N events (kvmtrace.testing.synth ``workload_stream``,
as tools/bench_replay.py does), then times ``replay_source`` over it K times in pairs,
alternating which goes first: plain, and through :func:`kvmtrace.views.progress.track`
with a live tqdm bar drawn on a pseudo-terminal (the bar only exists on a terminal; a
thread drains the pty). Prints the median of each and their ratio (with bar / without);
the bar is updated once per block, so the ratio should be 1 within noise. Wall-clock
pairs on a shared machine are noisy, so it also times what the bar adds directly: the cost
of one :meth:`Progress.update` on the live pty bar (best of runs of 10,000 calls) times the
number of blocks, as a fraction of the plain replay's time. Process CPU time is
used (``--wall`` for the wall clock). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import pty
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvmtrace.analysis.replay import replay_source  # noqa: E402
from kvmtrace.source.recording import open_recording  # noqa: E402
from kvmtrace.testing.synth import write_workload_recording  # noqa: E402
from kvmtrace.views.progress import Progress, events_total, track  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=5_000_000)
    ap.add_argument("--vcpus", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--wall", action="store_true", help="time the wall clock, not CPU time")
    args = ap.parse_args()
    clock = time.perf_counter if args.wall else time.process_time

    master, slave = pty.openpty()
    tty = os.fdopen(slave, "w", buffering=1)
    drained = [0]

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            drained[0] += len(chunk)

    threading.Thread(target=drain, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.kvt"
        n = write_workload_recording(path, args.events, args.vcpus)
        blocks = open_recording(path).blocks

        def plain() -> None:
            replay_source(open_recording(path))

        def with_bar() -> None:
            src = open_recording(path)
            with Progress("replay", events_total(src), stream=tty) as bar:
                assert bar.active
                replay_source(track(src, bar))

        plain()  # warm caches
        times: dict[str, list[float]] = {"plain": [], "bar": []}
        for i in range(args.pairs):
            order = [("plain", plain), ("bar", with_bar)]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
        with Progress("update cost", 10**9, stream=tty) as bar:
            per_call = float("inf")
            for _ in range(5):
                t0 = clock()
                for _ in range(10_000):
                    bar.update(1)
                per_call = min(per_call, (clock() - t0) / 10_000)
    a, b = statistics.median(times["plain"]), statistics.median(times["bar"])
    what = "wall clock" if args.wall else "process CPU time"
    print(f"recording: {n} events in {blocks} blocks; {args.pairs} pairs, alternating "
          f"order; {what}")
    print(f"replay without bar: median {a:.3f} s ({n / a / 1e6:.2f} M events/s)")
    print(f"replay with bar   : median {b:.3f} s ({n / b / 1e6:.2f} M events/s); "
          f"{drained[0]} bytes drawn on the pty")
    print(f"ratio with/without: {b / a:.3f}  (per pair: "
          + ", ".join(f"{y / x:.3f}" for x, y in zip(times['plain'], times['bar'],
                                                     strict=True)) + ")")
    print(f"one update on the live bar: {per_call * 1e6:.2f} us; x {blocks} blocks = "
          f"{per_call * blocks * 1e3:.3f} ms = {per_call * blocks / a:.2e} of the plain "
          "replay")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
