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
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

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


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--pairs", type=int, default=3, help="runs without + with top (3)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    ap.add_argument("--delay", type=float, default=1.0, help="top refresh, seconds (1)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="reaper",
                    help="workload: reaper (sustained, highest push rate; default) or tight "
                         "(one pass of first writes)")
    ap.add_argument("--light", action="store_true", help="run top --light (no push probe)")
    args = ap.parse_args()
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
