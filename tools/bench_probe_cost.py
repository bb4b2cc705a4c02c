#!/usr/bin/env python3
"""What kvmtrace's probes cost per dirty-ring event, measured by the kernel (bpf_stats).

Wall-clock slowdowns (tools/bench_top.py, tools/bench_record.py) are noisy on a shared or
nested-virtualised host; the kernel's own per-program counters are not. For each mode, the
built-in workload runs at its highest sustained push rate (tight guest loop, reaper harvest,
1 MiB rings) with these programs attached, and the push program's ns per run is put beside
the workload's ns per push (vCPU run time / pushes) measured in the same run:

  empty   probes/test/empty_push.c: the floor of any probe (dispatch + statistics)
  top     kvmtrace's probes with in-kernel aggregation (what `kvmtrace top` loads)
  record  kvmtrace's probes emitting every event into the ring buffer, read and written to
          a recording by a consumer thread (what `kvmtrace record` does)

Modes alternate for --rounds rounds; medians are printed. Needs root; turns
kernel.bpf_stats_enabled on for the run (announced, restored).

    .venv/bin/python tools/bench_probe_cost.py [--rounds 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvmtrace.bpf.progstats import bpf_stats, prog_stats  # noqa: E402

PUSH = "kvm_dirty_ring_push"


def workload(seconds: float) -> float:
    """Run the workload; ns per push per vCPU (run time / harvested entries)."""
    argv = [sys.executable, "-m", "kvmtrace", "workload", "--vcpus", "2", "--ring-bytes",
            "1048576", "--pages", "16000", "--exit-every", "0", "--harvest", "reaper",
            "--reaper-ms", "10", "--duration", str(seconds), "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rings = json.loads(out)["rings"]
    return statistics.mean(r["run_ns"] / r["harvested"] for r in rings)


def push_cost(funcs: dict) -> tuple[int, float]:
    for name, f in funcs.items():
        if PUSH in (name.decode() if isinstance(name, bytes) else name):
            s = prog_stats(f.fd)
            return s.run_cnt, s.ns_per_run or 0.0
    raise SystemExit("bench_probe_cost: no push program loaded")


def run_empty(seconds: float) -> tuple[int, float, float]:
    from bcc import BPF

    from kvmtrace.host.headers import use_headers

    use_headers()
    b = BPF(src_file=str(ROOT / "probes/test/empty_push.c").encode())
    try:
        ns_push = workload(seconds)
        return (*push_cost(b.funcs), ns_push)
    finally:
        b.cleanup()


def run_top(seconds: float) -> tuple[int, float, float]:
    from kvmtrace.bpf.loader import Probes

    with Probes(aggregate=True) as p:
        ns_push = workload(seconds)
        return (*push_cost(p._bpf.funcs), ns_push)


def run_record(seconds: float) -> tuple[int, float, float]:
    from kvmtrace.source.live import LiveEvents
    from kvmtrace.source.recording import RecordingWriter

    with tempfile.TemporaryDirectory() as tmp, LiveEvents() as src, \
            RecordingWriter(Path(tmp) / "bench.kvt", src.meta) as writer:
        def consume() -> None:
            for batch in src.batches():
                if len(batch):
                    writer.write(batch)

        t = threading.Thread(target=consume)
        t.start()
        try:
            ns_push = workload(seconds)
            return (*push_cost(src.probes._bpf.funcs), ns_push)
        finally:
            src.stop()
            t.join()


MODES = {"empty": run_empty, "top": run_top, "record": run_record}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_probe_cost: needs root (BPF)", file=sys.stderr)
        return 2
    got: dict[str, list[tuple[int, float, float]]] = {m: [] for m in MODES}
    with bpf_stats():
        print(f"{'round':>5} {'mode':>7} {'pushes':>9} {'ns/run':>7} {'ns/push':>8} "
              f"{'share':>6}")
        for i in range(args.rounds):
            for mode, fn in MODES.items():
                runs, ns_run, ns_push = fn(args.seconds)
                got[mode].append((runs, ns_run, ns_push))
                print(f"{i:>5} {mode:>7} {runs:>9} {ns_run:>7.1f} {ns_push:>8.0f} "
                      f"{100 * ns_run / ns_push:>5.1f}%", flush=True)
    print()
    floor = statistics.median(r[1] for r in got["empty"])
    for mode in MODES:
        ns_run = statistics.median(r[1] for r in got[mode])
        ns_push = statistics.median(r[2] for r in got[mode])
        print(f"{mode:>7}: push program {ns_run:6.1f} ns/run (floor {floor:.1f}, own "
              f"{ns_run - floor:6.1f}) = {100 * ns_run / ns_push:4.1f} % of a push "
              f"({ns_push:.0f} ns); ratio to floor {ns_run / floor:.2f}")
    print("goals: top <= 2 %, record <= 5 % of the workload's time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
