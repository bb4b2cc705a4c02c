#!/usr/bin/env python3
"""Repeat tests/test_qemu_dirtylimit_kvm.py's scenario: QEMU (1 vCPU, ring of 4096
entries) limited by ``set-vcpu-dirty-limit`` while ``kvmtrace record -p`` runs; per run,
replay's soft-full exits, stalls and throttled stalls against QEMU's own trace
(``kvm_dirty_ring_full``, ``dirtylimit_vcpu_execute``), and the harvest and throttle time.
A run fails on anything :func:`kvmtrace.testing.qemu_dirtylimit.dirty_limit_failures`
finds. Root only.

    .venv/bin/python tools/soak_qemu_dirtylimit.py [--runs 20] [--limit 100] [--seconds 4]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _common import kvmtrace_cmd, parser, soak_runs

from kvmtrace.source.recording import open_recording
from kvmtrace.testing.qemu import Qemu
from kvmtrace.testing.qemu_dirtylimit import (
    dirty_limit_failures,
    record_dirty_limit,
)
from kvmtrace.testing.qemu_trace import read_trace, trace_args
from kvmtrace.vmm.multiboot import MultibootGuest


def one_run(limit: int, seconds: float, tmp: Path) -> tuple[bool, str]:
    guest = MultibootGuest(vcpus=1, pages=16384, exit_every=16)
    log = tmp / "qemu-trace.log"
    with Qemu(guest, ring_entries=4096, name="soak-dirtylimit",
              extra_args=trace_args(log)) as qemu:
        qemu.wait_guest()
        run = record_dirty_limit(qemu, tmp / "limit.kvt", limit, seconds)
    p = subprocess.run(kvmtrace_cmd("replay", "--json", str(run.path)),
                       capture_output=True, text=True, timeout=300)
    report = json.loads(p.stdout)
    qtrace = read_trace(log)
    bad = dirty_limit_failures(run, report, qtrace, open_recording(run.path).read_all(), 1)
    sleeps = qtrace.throttle_sleeps.get(0, [])
    cells = [f"QEMU: {qtrace.full_exits.get(0, 0)} exits, {len(sleeps)} sleeps of "
             f"{sorted(set(sleeps))} us; current rate {[a['current-rate'] for a in run.answer]}"]
    for s in report["stall_split"]:
        cells.append(f"replay: {s['stalls']} stalls {s['stall_ns'] / 1e6:.1f} ms = harvest "
                     f"{s['harvest_ns'] / 1e6:.1f} + throttle {s['after_reset_ns'] / 1e6:.1f}"
                     f" ms, {s['throttled']} throttled, {s['unsplit']} unsplit")
    return not bad and bool(sleeps), "; ".join(cells + bad)


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--limit", type=int, default=100, help="MB/s per vCPU")
    ap.add_argument("--seconds", type=float, default=4.0)
    args = ap.parse_args()
    failed = soak_runs("", args.runs, lambda tmp: one_run(args.limit, args.seconds, tmp))
    print(f"{args.runs} runs, {failed} failed")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
