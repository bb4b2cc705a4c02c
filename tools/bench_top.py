#!/usr/bin/env python3
"""Benchmark ``kvmtrace top``: the workload's dirtying rate with top attached vs not, and
top's own CPU at its refresh interval, measured side by side in one run (as root).

Runs alternate (without, with, without, with, ...) so load from elsewhere hits both sides
alike; the ratio is taken per adjacent pair and the median reported. The workload is the
built-in VMM at the highest sustained push rate it offers here: a tight guest loop (no I/O
exits) over a 1 MiB ring with a reaper thread harvesting every 10 ms, so pages are dirtied
again as fast as they are given back. Pushes/s = harvested entries of all rings / run time,
from the workload's own JSON. top runs as ``top -b --json -p PID -d SECS``, attached before
the VM exists; its CPU is utime + stime from /proc over the workload's run only (the BPF
compile before it is left out and reported on its own). With ``--light`` top runs as
``top --light`` (no probe on every push).

    .venv/bin/python tools/bench_top.py [--pairs 3] [--duration 5] [--delay 1] [--config reaper]
                                        [--light]

With ``--replay``, ``top --replay`` over a recording instead (no root needed): per round,
side by side, decoding the recording alone (its blocks to columns, the decode every reader
needs), ``top -b --replay FILE --json -j 1`` (one process) and ``-j N`` (the rings counted
in N worker processes, the default N being the idle CPUs as top samples them), each a
fresh process (interpreter start included) with its output to /dev/null. Prints per round
events/s and the ratios -j N / -j 1 and -j N / decode, then the median and the spread
(min..max); the CPU seconds of every process (the workers' included) too: on a machine
shared with other work, N processes need N idle cores for their wall time, their CPU time
does not. The recording is the workload-like stream of ``--events`` events (as
tools/bench_parallel.py writes it) or ``--from FILE`` (e.g. a ``kvmtrace record`` of a real
run). Run it under the shared lock, so that no other benchmark overlaps:

    flock /tmp/kvmtrace-bench.lock .venv/bin/python tools/bench_top.py --replay \
        [--events 8000000] [--vcpus 4] [--rounds 5] [--jobs N] [--from FILE] [--text]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    ROOT,
    Column,
    Table,
    cpu_seconds,
    kvmtrace_cmd,
    parser,
    require_root,
)
from textcapture import held

CONFIGS = {
    # sustained: pages dirtied again as soon as the reaper gives them back
    "reaper": ["--vcpus", "2", "--ring-bytes", "1048576", "--pages", "16000", "--exit-every",
               "0", "--harvest", "reaper", "--reaper-ms", "10"],
    # one pass of first writes, nothing in user space while the guest runs (--duration unused)
    "tight": ["--vcpus", "2", "--ring-bytes", "1048576", "--pages", "60000", "--exit-every",
              "0"],
}
TABLE = Table([Column("run", ">3"), Column("top", ">4"), Column("pushes/s", ">10", ">10.0f"),
               Column("pushes/cpu-s", ">12", ">12.0f"), Column("top CPU %", ">9"),
               Column("attach s", ">8")])


def pushes_per_s(result: dict) -> float:
    pushes = sum(r["harvested"] for r in result["rings"])
    return pushes * 1e9 / max(r["run_ns"] for r in result["rings"])


def one_run(config: str, duration: float, delay: float, with_top: bool,
            light: bool = False) -> dict:
    extra = ["--duration", str(duration)] if config == "reaper" else []
    wl_argv = kvmtrace_cmd("workload", *CONFIGS[config], *extra, "--json")
    wl = subprocess.Popen(held(wl_argv), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    top = None
    out: dict = {"top": with_top}
    try:
        if with_top:
            t0 = time.monotonic()
            top = subprocess.Popen(
                kvmtrace_cmd("top", "-b", "--json", "-p", str(wl.pid), "-d", str(delay),
                         *(["--light"] if light else [])),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
            assert top.stdout is not None
            first = top.stdout.readline()  # attached (BPF compiled and loaded)
            if not first:
                raise SystemExit("bench_top: top ended before attaching (root? doctor?)")
            out["attach_s"] = time.monotonic() - t0
            out["attach_cpu_s"] = cpu_seconds(top.pid)
        assert wl.stdin is not None
        cpu0 = cpu_seconds(top.pid) if top else 0.0
        w0 = time.monotonic()
        wl.stdin.write(b"g")
        wl.stdin.flush()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        stdout, stderr = wl.communicate(timeout=duration * 10 + 60)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # now includes the workload
        wall = time.monotonic() - w0
        if wl.returncode != 0:
            raise SystemExit(f"bench_top: workload failed: {stderr.decode().strip()}")
        result = json.loads(stdout)
        out["pushes_per_s"] = pushes_per_s(result)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        out["pushes_per_cpu_s"] = sum(r["harvested"] for r in result["rings"]) / cpu
        out["lost"] = result["lost_suspected"]
        if top:
            out["top_cpu_pct"] = 100.0 * (cpu_seconds(top.pid) - cpu0) / wall
        return out
    finally:
        if top is not None:
            top.terminate()
            top.wait(timeout=30)
        if wl.poll() is None:
            wl.kill()
            wl.wait()


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall s, CPU s of the process and the children it waited for) of one command."""
    c0, t0 = children_cpu(), time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True,
                   cwd=ROOT, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0, children_cpu() - c0


def decode_only(path: str) -> int:
    """(--decode-only) The recording's blocks decoded to columns, nothing else."""
    from kvmtrace.source.recording import open_recording

    for _ in open_recording(path).column_batches():
        pass
    return 0


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):5.2f} (min {min(xs):5.2f}, max {max(xs):5.2f})"


def replay_rounds(path: Path, events: int, jobs: int, rounds: int, text: bool) -> None:
    fmt = [] if text else ["--json"]
    argvs = {
        "decode": [sys.executable, __file__, "--decode-only", str(path)],
        "top -j 1": kvmtrace_cmd("top", "-b", *fmt, "--replay", str(path), "-j", "1"),
        f"top -j {jobs}": kvmtrace_cmd("top", "-b", *fmt, "--replay", str(path), "-j",
                                       str(jobs)),
    }
    for argv in argvs.values():  # warm: page cache, imports
        timed(argv)
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in argvs}
    many = f"top -j {jobs}"
    for r in range(rounds):
        got = {k: timed(argv) for k, argv in argvs.items()}
        for k, v in got.items():
            rows[k].append(v)
        d, one, n = (got[k][0] for k in argvs)
        print(f"  round {r + 1}: decode {events / d / 1e6:6.2f}  top -j 1 {events / one / 1e6:6.2f}"
              f"  top -j {jobs} {events / n / 1e6:6.2f} M events/s;  -j {jobs}/-j 1 {one / n:4.2f}"
              f"  -j {jobs}/decode {d / n:4.2f}   load {os.getloadavg()[0]:.1f}", flush=True)
    walls = {k: [w for w, _ in v] for k, v in rows.items()}
    cpus = {k: [c for _, c in v] for k, v in rows.items()}
    print(f"over {rounds} rounds (wall time; each a new process, interpreter start included):")
    for k in rows:
        print(f"  {k:<9} M events/s {spread([events / w / 1e6 for w in walls[k]])}   CPU s "
              f"{spread(cpus[k])}")
    r1 = [a / b for a, b in zip(walls["top -j 1"], walls[many], strict=True)]
    rd = [a / b for a, b in zip(walls["decode"], walls[many], strict=True)]
    r0 = [a / b for a, b in zip(walls["decode"], walls["top -j 1"], strict=True)]
    print(f"  top -j {jobs} / top -j 1: {spread(r1)}")
    print(f"  top -j {jobs} / decode:   {spread(rd)}")
    print(f"  top -j 1 / decode:   {spread(r0)}")
    extra = [c / o for c, o in zip(cpus[many], cpus["top -j 1"], strict=True)]
    print(f"  CPU: top -j {jobs} spends {spread(extra)} x the one-process CPU")


def replay_main(args: argparse.Namespace) -> int:
    from kvmtrace.analysis.replay.parallel import default_jobs
    from kvmtrace.source.recording import open_recording

    idle = default_jobs()
    jobs = args.jobs or max(2, idle)  # N >= 2: what is measured is N processes
    print(f"{os.cpu_count()} CPUs, affinity {sorted(os.sched_getaffinity(0))}, idle now "
          f"{idle}, jobs {jobs}; "
          f"load average {os.getloadavg()[0]:.1f} (other work on this machine slows the "
          "N-process run first: it needs N idle cores)", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        if args.source:
            path = Path(args.source)
        else:
            from kvmtrace.testing.synth import write_workload_recording

            path = Path(d) / "stream.kvt"
            write_workload_recording(path, args.events, args.vcpus)
        events = open_recording(path).events
        print(f"recording: {path.name}, {events} events, "
              f"{path.stat().st_size / max(events, 1):.2f} B/event; top "
              f"{'text' if args.text else '--json'}", flush=True)
        replay_rounds(path, events, jobs, args.rounds, args.text)
    return 0


def main() -> int:
    ap = parser(__doc__, rounds=5)
    ap.add_argument("--replay", action="store_true",
                    help="top --replay over a recording: -j N against -j 1 and decoding")
    ap.add_argument("--events", type=int, default=8_000_000, help="--replay: events (8 M)")
    ap.add_argument("--vcpus", type=int, default=4, help="--replay: vCPUs of the stream (4)")
    ap.add_argument("--jobs", type=int, default=0,
                    help="--replay: N >= 2 (default: the idle CPUs, at least 2)")
    ap.add_argument("--from", dest="source", metavar="FILE",
                    help="--replay: this recording instead of the stream")
    ap.add_argument("--text", action="store_true", help="--replay: text instead of --json")
    ap.add_argument("--decode-only", metavar="FILE", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=3, help="runs without + with top (3)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    ap.add_argument("--delay", type=float, default=1.0, help="top refresh, seconds (1)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="reaper",
                    help="workload: reaper (sustained, highest push rate; default) or tight "
                         "(one pass of first writes)")
    ap.add_argument("--light", action="store_true", help="run top --light (no push probe)")
    args = ap.parse_args()
    if args.decode_only:
        return decode_only(args.decode_only)
    if args.replay:
        return replay_main(args)
    require_root("bench_top", "BPF")
    print(f"workload: {' '.join(CONFIGS[args.config])}"
          + (f" --duration {args.duration:g}" if args.config == "reaper" else ""))
    print(f"top: {'top --light (no push probe)' if args.light else 'top (all probes)'}")
    print(TABLE.header())
    wall_ratios: list[float] = []
    cpu_ratios: list[float] = []
    cpus: list[float] = []
    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.pairs):
        pair = []
        for with_top in (False, True):
            r = one_run(args.config, args.duration, args.delay, with_top, args.light)
            rates[with_top].append(r["pushes_per_s"])
            pair.append(r)
            cpu = f"{r['top_cpu_pct']:.2f}" if with_top else "-"
            att = f"{r['attach_s']:.2f}" if with_top else "-"
            print(TABLE.row(i, "yes" if with_top else "no", r["pushes_per_s"],
                            r["pushes_per_cpu_s"], cpu, att), flush=True)
            if with_top:
                cpus.append(r["top_cpu_pct"])
        wall_ratios.append(pair[1]["pushes_per_s"] / pair[0]["pushes_per_s"])
        cpu_ratios.append(pair[1]["pushes_per_cpu_s"] / pair[0]["pushes_per_cpu_s"])
    print()
    print(f"pushes/s median: without top {statistics.median(rates[False]):.0f}, "
          f"with top {statistics.median(rates[True]):.0f}")
    for name, ratios in (("wall-clock rate", wall_ratios), ("rate per CPU second", cpu_ratios)):
        slow = 100.0 * (1.0 - statistics.median(ratios))
        print(f"{name}, with/without per pair: {', '.join(f'{x:.3f}' for x in ratios)}")
        print(f"  median slowdown {slow:.1f} % (goal <= 2 %)")
    print(f"top CPU at {args.delay:g} s refresh: median {statistics.median(cpus):.2f} % of a "
          f"core, max {max(cpus):.2f} % (goal <= 1 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
