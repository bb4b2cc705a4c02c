#!/usr/bin/env python3
"""Recording overhead, loss and size, side by side in one run (issue C, item 7).

Runs the built-in workload at the highest push rate this machine reaches (tight guest loop,
no I/O exits, 1 MiB rings) three ways, alternating, ROUNDS times each:

  none     the workload alone
  kvmtrace kvmtrace record -o FILE -- workload
  perf     perf record -e kvm:kvm_dirty_ring_{push,reset,exit} -o FILE -- workload

and prints the median dirtying rate (guest page writes per second per vCPU, from the
workload's own JSON) of each, the slowdown ratios, events lost, and bytes per event.
Goals: kvmtrace <= 5 % slower than none and below perf; 0 lost; <= 3 bytes/event.

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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvmtrace.source.events import Kind  # noqa: E402
from kvmtrace.source.recording import open_recording  # noqa: E402

KVMTRACE = [sys.executable, "-m", "kvmtrace"]
PERF_EVENTS = ["-e", "kvm:kvm_dirty_ring_push", "-e", "kvm:kvm_dirty_ring_reset",
               "-e", "kvm:kvm_dirty_ring_exit"]


def workload(args: argparse.Namespace) -> list[str]:
    return [*KVMTRACE, "workload", "--json", "--vcpus", str(args.vcpus), "--ring-bytes",
            "1048576", "--pages", str(args.pages), "--exit-every", "0", "--duration",
            str(args.seconds)]


def rate(truth: dict) -> float:
    """Guest page writes per second per vCPU."""
    return statistics.mean(r["pages_written"] / (r["run_ns"] / 1e9) for r in truth["rings"])


def run_once(mode: str, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{mode}.data"
    cmd = workload(args)
    if mode == "kvmtrace":
        cmd = [*KVMTRACE, "record", "-o", str(out), "--", *cmd]
    elif mode == "perf":
        cmd = ["perf", "record", "-q", *PERF_EVENTS, "-o", str(out), "--", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    truth = json.loads(proc.stdout)
    res = {"rate": rate(truth), "pushes": sum(r["pages_written"] for r in truth["rings"])}
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--pages", type=int, default=20000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_record: run as root (BPF and perf tracepoints)")
    modes = ["none", "kvmtrace"] + (["perf"] if shutil.which("perf") else [])
    results: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for mode in modes if i % 2 == 0 else reversed(modes):
                results[mode].append(run_once(mode, args, Path(tmp)))
    base = statistics.median(r["rate"] for r in results["none"])
    print(f"workload: {args.vcpus} vCPUs, tight loop, 1 MiB rings, {args.seconds} s, "
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
    k = results["kvmtrace"]
    missing = sum(r["pushes"] - r["rec_pushes"] for r in k)
    print(f"kvmtrace: guest page writes - recorded pushes = {missing} over all rounds "
          "(each write pushes one entry on this kernel; 0 = nothing lost on the way)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
