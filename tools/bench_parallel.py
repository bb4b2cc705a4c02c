#!/usr/bin/env python3
"""Benchmark of replay on every core (``kvmtrace replay -j N``) against its anchors, side by
side in one run: decoding alone, the one-core replay, the N-core replay.

    .venv/bin/python tools/bench_parallel.py [--events N] [--vcpus V] [--rounds R] [--jobs N]
                                            [--big N]

The recording is the workload-like stream (:func:`kvmtrace.testing.synth.workload_stream`:
vCPUs pushing with jitter, soft-full exits, stalls, periodic resets), written with the
ring sizes in its meta as ``kvmtrace record`` writes them. Each round runs, in turn:

  decode       the recording's blocks decoded to columns, nothing else (the decode a
               replay needs: ``Recording.column_batches()``)
  replay 1     ``replay_source(..., jobs=1)`` with the migration analysis's tap, as
               ``kvmtrace replay -j 1`` does
  replay N     the same with ``jobs=N`` (rings spread over N processes)
  N x 1        N one-core replays at once in N processes (forked): what running N
               processes side by side costs on this host alone (shared caches, memory,
               clock), the part of replay N's extra CPU that no change to it removes

and prints events/s and the ratios replay N / replay 1 (goal >= 1.7 on 2 cores) and
replay N / decode (goal >= 0.5), per round, then the median and the spread (min..max) over
the rounds. Wall time; the CPU seconds of every process (the workers' included) are
printed too: on a machine shared with other work the wall time of N processes needs N
idle cores, which the CPU time does not. The CPU of replay N over N one-core replays
side by side is the replay's own cost of spreading (forks, shared memory, pickles).
``--big N`` also writes an N-event recording (bounded memory) and replays it with N jobs
in a child process, printing the peak RSS of the parent and of the largest worker (goal:
100 M events under 1 GiB in all).
Prints figures; asserts nothing.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parser

from kvmtrace.analysis.migration import ExtrasTap
from kvmtrace.analysis.replay import replay_source
from kvmtrace.analysis.replay.parallel import default_jobs
from kvmtrace.source.recording import open_recording
from kvmtrace.testing.synth import write_bulk_recording, write_workload_recording

GOAL_CORES = 1.7  # N-core replay / one-core replay, on 2 cores
GOAL_DECODE = 0.5  # N-core replay / decode alone
GOAL_RSS = 1 << 30  # bytes, 100 M events


def cpu_now() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall s, CPU s of this process and its waited-for children)."""
    c0, t0 = cpu_now(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu_now() - c0


def decode(path: Path) -> None:
    for _ in open_recording(path).column_batches():
        pass


def replay(path: Path, jobs: int) -> None:
    replay_source(open_recording(path), ExtrasTap(), jobs=jobs, min_events=0)


def side_by_side(path: Path, jobs: int) -> None:
    """``jobs`` one-core replays at once, each in a forked process."""
    pids = []
    for _ in range(jobs):
        pid = os.fork()
        if pid == 0:  # the child never returns
            status = 1
            try:
                replay(path, 1)
                status = 0
            finally:
                os._exit(status)
        pids.append(pid)
    for pid in pids:
        if os.waitpid(pid, 0)[1]:
            raise RuntimeError("a side-by-side replay failed")


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):5.2f} (min {min(xs):5.2f}, max {max(xs):5.2f})"


def rounds(path: Path, n: int, jobs: int, count: int) -> None:
    replay(path, jobs)  # warm: imports, page cache
    pair = f"{jobs} x 1"
    rows: dict[str, list[tuple[float, float]]] = {"decode": [], "replay 1": [],
                                                    f"replay {jobs}": [], pair: []}
    for r in range(count):
        got = {"decode": timed(lambda: decode(path)),
               "replay 1": timed(lambda: replay(path, 1)),
               f"replay {jobs}": timed(lambda: replay(path, jobs)),
               pair: timed(lambda: side_by_side(path, jobs))}
        for k, v in got.items():
            rows[k].append(v)
        d, one, many, _ = (got[k][0] for k in rows)
        host = got[pair][1] / (jobs * got["replay 1"][1])
        own = got[f"replay {jobs}"][1] / got[pair][1] * jobs
        print(f"  round {r + 1}: decode {n / d / 1e6:6.2f}  replay 1 {n / one / 1e6:6.2f}  "
              f"replay {jobs} {n / many / 1e6:6.2f} M events/s;  N/1 {one / many:4.2f}  "
              f"N/decode {d / many:4.2f};  CPU: host {host:4.2f}  own {own:4.2f}   "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    walls = {k: [w for w, _ in v] for k, v in rows.items()}
    cpus = {k: [c for _, c in v] for k, v in rows.items()}
    many = f"replay {jobs}"
    print(f"over {count} rounds (wall time):")
    for k in rows:
        if k == pair:  # its events/s: of one of them
            continue
        print(f"  {k:<10} M events/s {spread([n / w / 1e6 for w in walls[k]])}   CPU s "
              f"{spread(cpus[k])}")
    r1 = [a / b for a, b in zip(walls["replay 1"], walls[many], strict=True)]
    rd = [a / b for a, b in zip(walls["decode"], walls[many], strict=True)]
    print(f"  replay {jobs} / replay 1: {spread(r1)}   goal {GOAL_CORES} -> ratio "
          f"{statistics.median(r1) / GOAL_CORES:.2f}")
    print(f"  replay {jobs} / decode:   {spread(rd)}   goal {GOAL_DECODE} -> ratio "
          f"{statistics.median(rd) / GOAL_DECODE:.2f}")
    # what N idle cores would give: the critical path is the busiest worker, about the
    # CPU time spread evenly (the workers' shares are balanced by the planner)
    cp = statistics.median(cpus[many]) / jobs
    extra = [c / o for c, o in zip(cpus[many], cpus["replay 1"], strict=True)]
    print(f"  CPU: replay {jobs} spends {spread(extra)} x the one-core CPU; on {jobs} idle "
          f"cores: replay {jobs} / replay 1 about {statistics.median(cpus['replay 1']) / cp:.2f}"
          f", / decode about {statistics.median(cpus['decode']) / cp:.2f}")
    host = [p / (jobs * o) for p, o in zip(cpus[pair], cpus["replay 1"], strict=True)]
    own = [jobs * m / p for m, p in zip(cpus[many], cpus[pair], strict=True)]
    print(f"  of which this host: {jobs} one-core replays side by side spend {spread(host)} x "
          f"the CPU of one alone; replay {jobs}'s own: {spread(own)} x theirs")


def write_big(n: int, path: Path) -> None:
    """n events of bulk_stream cycles (bounded memory): testing.synth.write_bulk_recording."""
    write_bulk_recording(n, path, sizes_in_meta=True)


def child(path: str, jobs: int) -> int:
    t0 = time.perf_counter()
    rep = replay_source(open_recording(path), ExtrasTap(), jobs=jobs, min_events=0)
    secs = time.perf_counter() - t0
    hwm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"events": rep.events, "secs": secs, "rss": hwm, "worker": worker,
                      "anomalies": len(rep.anomalies), "rings": len(rep.rings)}))
    return 0


def big(n: int, jobs: int, tmp: Path) -> None:
    path = tmp / "big.kvt"
    t0 = time.perf_counter()
    write_big(n, path)
    print(f"big: {n} events written in {time.perf_counter() - t0:.0f} s, "
          f"{path.stat().st_size / 2**20:.0f} MiB", flush=True)
    for j in (1, jobs):
        p = subprocess.run([sys.executable, __file__, "--child", str(path), "--jobs", str(j)],
                           capture_output=True, text=True, check=True)
        d = json.loads(p.stdout)
        total = d["rss"] + (j - 1) * d["worker"]
        print(f"  replay {j}: {d['secs']:.1f} s = {d['events'] / d['secs'] / 1e6:.2f} M events/s,"
              f" peak RSS parent {d['rss'] / 2**20:.0f} MiB, largest worker "
              f"{d['worker'] / 2**20:.0f} MiB (ru_maxrss: at least the parent's at fork), "
              f"at most {total / 2**20:.0f} MiB in all (goal < 1024 for 100 M: ratio "
              f"{total / GOAL_RSS:.2f}); {d['anomalies']} anomalies, {d['rings']} rings",
              flush=True)


def main() -> int:
    ap = parser(__doc__, rounds=5)
    ap.add_argument("--events", type=int, default=8_000_000)
    ap.add_argument("--vcpus", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=default_jobs())
    ap.add_argument("--big", type=int, nargs="?", const=100_000_000, default=0, metavar="N")
    ap.add_argument("--child", metavar="FILE", help="(internal)")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.jobs)
    print(f"{os.cpu_count()} CPUs, affinity {sorted(os.sched_getaffinity(0))}, jobs "
          f"{args.jobs}; load average {os.getloadavg()[0]:.1f} (other work on this machine "
          "slows the N-process replay first: it needs N idle cores)", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        tmp = Path(d)
        path = tmp / "stream.kvt"
        write_workload_recording(path, args.events, args.vcpus)
        print(f"stream: {args.events} events, {args.vcpus} vCPUs, "
              f"{path.stat().st_size / args.events:.2f} B/event", flush=True)
        rounds(path, args.events, args.jobs, args.rounds)
        if args.big:
            big(args.big, args.jobs, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
