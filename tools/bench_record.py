#!/usr/bin/env python3
"""Recording overhead, loss and size, side by side in one run (issue C, item 7).

Runs the built-in workload at the highest sustained push rate this machine reaches (tight
guest loop, no I/O exits, 1 MiB rings, a reaper thread harvesting every 10 ms, as
bench_top.py and bench_probe_cost.py) three ways, alternating, ROUNDS times each:

  none     the workload alone
  kvmtrace kvmtrace record -o FILE -- workload
  perf     perf record -e kvm:kvm_dirty_ring_{push,reset,exit} -o FILE -- workload

and prints the median dirtying rate (guest page writes per second per vCPU, from the
workload's own JSON) of each, the slowdown ratios, events lost, and bytes per event; then
per round, each tracer's ratio to the same round's untraced run, by wall rate and by the
vCPU threads' own CPU time per guest write (the workload's cpu_ns): on a host whose CPUs
other processes keep busy, the wall rate mostly measures the scheduler, the CPU time per
write what the tracer adds to each write.
Goals: kvmtrace <= 5 % slower than none and below perf; 0 lost; <= 3 bytes/event.

Then the tracer process's own CPU (utime + stime of `kvmtrace record` or `perf record`,
all threads, not its child workload), from /proc/PID/stat sampled every 20 ms: while the
workload ran (from the tracer's output file appearing to its child's exit), per recorded
event and as % of one core over that wall time; and in all (read after the tracer exited,
before it is reaped: waitid WNOWAIT), start-up (probe compilation) and exit included.
/proc/PID/stat counts clock ticks (10 ms): the figures are summed over all rounds.

    .venv/bin/python tools/bench_record.py [--rounds 3] [--seconds 3] [--vcpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_seconds, kvmtrace_cmd, parser, reaper_workload, require_root

from kvmtrace.core.events import Kind
from kvmtrace.source.recording import open_recording

PERF_EVENTS = ["-e", "kvm:kvm_dirty_ring_push", "-e", "kvm:kvm_dirty_ring_reset",
               "-e", "kvm:kvm_dirty_ring_exit"]


def workload(args: argparse.Namespace) -> list[str]:
    return reaper_workload(args.seconds, vcpus=args.vcpus, pages=args.pages)


def rate(truth: dict) -> float:
    """Guest page writes per second per vCPU."""
    return statistics.mean(r["pages_written"] / (r["run_ns"] / 1e9) for r in truth["rings"])


def children(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return f.read().split()
    except OSError:
        return []


def run_traced(cmd: list[str], out: Path, tmp: Path) -> tuple[str, str, int, dict]:
    """Run ``cmd`` (a tracer writing ``out`` while its child workload runs); its stdout,
    stderr, exit status and its own CPU: at start-up (until ``out`` appeared), while its
    child ran (``cpu_s`` over ``wall_s``), and in all."""
    with open(tmp / "stdout", "w+") as so, open(tmp / "stderr", "w+") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True)
        t0 = time.monotonic()
        cpu0 = cpu1 = start = end = None
        child = None
        # sample every 20 ms until the child has exited; never reap the tracer here
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            now = time.monotonic()
            if now - t0 > 600:
                proc.kill()
            if cpu0 is None:
                # kvmtrace record writes OUT.PID.partial until it ends; perf writes OUT
                partial = out.with_name(f"{out.name}.{proc.pid}.partial")
                if any(p.exists() and p.stat().st_size for p in (out, partial)):
                    cpu0, start = cpu_seconds(proc.pid), now
            elif child is None:
                kids = children(proc.pid)
                child = kids[0] if kids else None
            elif child not in children(proc.pid):
                break
            else:
                cpu1, end = cpu_seconds(proc.pid), now
            time.sleep(0.02)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        total = cpu_seconds(proc.pid)
        rc = proc.wait()
        so.seek(0)
        se.seek(0)
        usage = {"start_s": cpu0 or 0.0, "cpu_s": (cpu1 or 0.0) - (cpu0 or 0.0),
                 "wall_s": (end or 0.0) - (start or 0.0), "total_s": total}
        return so.read(), se.read(), rc, usage


def run_once(mode: str, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{mode}.data"
    out.unlink(missing_ok=True)
    cmd = workload(args)
    if mode == "kvmtrace":
        cmd = kvmtrace_cmd("record", "-o", str(out), "--", *cmd)
    elif mode == "perf":
        cmd = ["perf", "record", "-q", *PERF_EVENTS, "-o", str(out), "--", *cmd]
    if mode == "none":
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        stdout, stderr, rc, usage = proc.stdout, proc.stderr, proc.returncode, {}
    else:
        stdout, stderr, rc, usage = run_traced(cmd, out, tmp)
    if rc != 0:
        raise SystemExit(f"{mode}: exit {rc}: {stderr.strip()[-500:]}")
    truth = json.loads(stdout)
    written = sum(r["pages_written"] for r in truth["rings"])
    res = {"rate": rate(truth), "pushes": written,
           "cpu_per_write": sum(r.get("cpu_ns", 0) for r in truth["rings"]) / max(1, written),
           **usage}
    if mode == "kvmtrace":
        rec = open_recording(out)
        events = 0
        pushes = 0
        for batch in rec.batches():
            events += len(batch)
            pushes += int((batch["kind"] == Kind.PUSH).sum())
        res.update(events=events, lost=rec.lost, bytes=out.stat().st_size, rec_pushes=pushes)
    elif mode == "perf":
        script = subprocess.run(["perf", "script", "-i", str(out)], capture_output=True,
                                text=True, timeout=600)
        res.update(events=script.stdout.count("\n"), bytes=out.stat().st_size,
                   lost=script.stderr.count("LOST"))
    return res


def per_round(results: dict[str, list[dict]], modes: list[str], key: str, title: str,
              anchor: str) -> None:
    """Print, per tracer, each round's ``key`` relative to the same round's untraced run,
    their median and spread, then the untraced values (the anchor)."""
    print(title)
    for mode in modes[1:]:
        ratios = [r[key] / n[key] - 1 for r, n in
                  zip(results[mode], results["none"], strict=True)]
        print(f"{mode:<10}" + "".join(f"{x * 100:>+8.1f}%" for x in ratios)
              + f"   median {statistics.median(ratios) * 100:+.1f}%, spread "
              f"{min(ratios) * 100:+.1f}% .. {max(ratios) * 100:+.1f}%")
    print(f"{'none':<10}" + "".join(f"{r[key]:>9,.0f}" for r in results["none"])
          + "   " + anchor)


def main() -> int:
    ap = parser(__doc__, rounds=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--pages", type=int, default=16000)
    args = ap.parse_args()
    require_root("bench_record", "BPF and perf tracepoints")
    modes = ["none", "kvmtrace"] + (["perf"] if shutil.which("perf") else [])
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for mode in modes if i % 2 == 0 else reversed(modes):
                results[mode].append(run_once(mode, args, Path(tmp)))
    base = statistics.median(r["rate"] for r in results["none"])
    print(f"workload: {args.vcpus} vCPUs, tight loop, reaper, 1 MiB rings, {args.seconds} s, "
          f"{args.rounds} rounds (median)")
    print(f"{'tracer':<10}{'writes/s/vCPU':>15}{'vs none':>9}{'events':>11}{'lost':>7}"
          f"{'bytes/ev':>10}")
    for mode in modes:
        rs = results[mode]
        med = statistics.median(r["rate"] for r in rs)
        ev = sum(r.get("events", 0) for r in rs)
        lost = sum(r.get("lost", 0) for r in rs)
        size = sum(r.get("bytes", 0) for r in rs)
        per = f"{size / ev:.2f}" if ev else "-"
        print(f"{mode:<10}{med:>15,.0f}{(med / base - 1) * 100:>+8.1f}%{ev:>11}{lost:>7}"
              f"{per:>10}")
    per_round(results, modes, "rate", "per round (the modes of a round ran back to back): "
              "each tracer's rate / the same round's none",
              "writes/s/vCPU (the anchor; a busy host moves it)")
    per_round(results, modes, "cpu_per_write", "per round: the vCPU threads' own CPU time "
              "per guest write (guest, kernel and probes; not grown by waiting for a CPU "
              "other processes hold) / the same round's none",
              "vCPU CPU ns per guest write (the anchor)")
    print("tracer's own CPU (not its workload's), summed over rounds: while the workload ran,"
          " per event and % of a core; in all, with start-up and exit")
    print(f"{'tracer':<10}{'running s':>10}{'ns/event':>10}{'% core':>8}{'start s':>9}"
          f"{'total s':>9}{'ns/event':>10}")
    for mode in modes[1:]:
        rs = results[mode]
        cpu = sum(r["cpu_s"] for r in rs)
        ev = sum(r["events"] for r in rs)
        wall = sum(r["wall_s"] for r in rs)
        total = sum(r["total_s"] for r in rs)
        start = sum(r["start_s"] for r in rs)
        per, per_all = (f"{cpu / ev * 1e9:.0f}", f"{total / ev * 1e9:.0f}") if ev else "--"
        print(f"{mode:<10}{cpu:>10.2f}{per:>10}{cpu / wall * 100 if wall else 0:>7.1f}%"
              f"{start:>9.2f}{total:>9.2f}{per_all:>10}")
    k = results["kvmtrace"]
    missing = sum(r["pushes"] - r["rec_pushes"] for r in k)
    print(f"kvmtrace: guest page writes - recorded pushes = {missing} over all rounds "
          "(each write pushes one entry on this kernel; 0 = nothing lost on the way)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
