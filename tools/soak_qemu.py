#!/usr/bin/env python3
"""Repeat tests/test_qemu_kvm.py's scenario: kvmtrace's dirty rate against QEMU's own.

Each run boots QEMU (``-accel kvm,dirty-ring-size=4096``) on the generated multiboot guest
(16384 pages per vCPU, an ``out`` every 16 writes), records it with ``kvmtrace record -p``
across one ``calc-dirty-rate`` (mode ``dirty-ring``, 2 s), replays the recording and prints,
per vCPU: the ring's pushes on QEMU's window (first push to QEMU's final reset) and the
entries QEMU harvested in it (the resets' reset_index advance), kvmtrace's MB/s on that
window rounded as QEMU rounds, QEMU's ``vcpu-dirty-rate``, their difference, and
``replay``'s ``dirty_rate_mbps`` over the ring's first to last push. A run fails when the
rounded figure is more than 1 % from QEMU's, when the harvested entries do not give QEMU's
figure exactly, or when QEMU's is below 40 MB/s (the guest did not run, or QEMU's ring
overflowed and livelocked). Root only.

    .venv/bin/python tools/soak_qemu.py [--runs 20] [--vcpus 1,2] [--seconds 2]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _common import kvmtrace_cmd, parser, soak_runs

from kvmtrace.source.recording import open_recording
from kvmtrace.testing.qemu import (
    Qemu,
    compare_with_qemu,
    qemu_mbps,
    record_calc_dirty_rate,
)
from kvmtrace.vmm.multiboot import MultibootGuest

MIN_MBPS = 40  # the guest ran: a QEMU livelocked after an overflow reports 8-23 MB/s


def one_run(vcpus: int, seconds: int, tmp: Path) -> tuple[bool, str]:
    guest = MultibootGuest(vcpus=vcpus, pages=16384, exit_every=16)
    with Qemu(guest, ring_entries=4096, name=f"soak{vcpus}") as qemu:
        qemu.wait_guest()
        run = record_calc_dirty_rate(qemu, tmp / "calc.kvt", seconds)
    p = subprocess.run(kvmtrace_cmd("replay", "--json", str(run.path)),
                       capture_output=True, text=True, timeout=300)
    report = json.loads(p.stdout)
    rows = compare_with_qemu(open_recording(run.path).read_all(), report, run.qemu)
    calc_ms = seconds * 1000
    ok = all(a.qemu_mbps >= MIN_MBPS and a.rel_diff <= 0.01
             and qemu_mbps(a.harvested, calc_ms) == a.qemu_mbps for a in rows)
    kinds = sorted({a["kind"] for a in report["anomalies"]})
    cells = [f"vcpu{a.vcpu} {a.entries} pushes ({a.harvested} harvested): "
             f"{a.kvmtrace_rounded} vs QEMU {a.qemu_mbps} MB/s ({100 * a.rel_diff:.2f} %), "
             f"span {a.span_mbps}" for a in rows]
    return ok, "; ".join(cells) + (f"; anomalies {kinds}" if kinds else "")


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--vcpus", default="1,2", help="comma-separated vCPU counts")
    ap.add_argument("--seconds", type=int, default=2, help="calc-time (default 2)")
    args = ap.parse_args()
    counts = [int(v) for v in args.vcpus.split(",")]
    failed = sum(soak_runs(f"{n} vCPU ", args.runs,
                           lambda tmp, n=n: one_run(n, args.seconds, tmp)) for n in counts)
    print(f"{args.runs * len(counts)} runs, {failed} outside 1 %")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
