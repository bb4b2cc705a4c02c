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

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvmtrace.source.recording import open_recording  # noqa: E402
from kvmtrace.testing.qemu import (  # noqa: E402
    Qemu,
    compare_with_qemu,
    qemu_mbps,
    record_calc_dirty_rate,
)
from kvmtrace.vmm.multiboot import MultibootGuest  # noqa: E402

MIN_MBPS = 40  # the guest ran: a QEMU livelocked after an overflow reports 8-23 MB/s


def one_run(vcpus: int, seconds: int, tmp: Path) -> tuple[bool, str]:
    guest = MultibootGuest(vcpus=vcpus, pages=16384, exit_every=16)
    with Qemu(guest, ring_entries=4096, name=f"soak{vcpus}") as qemu:
        qemu.wait_guest()
        run = record_calc_dirty_rate(qemu, tmp / "calc.kvt", seconds)
    p = subprocess.run([sys.executable, "-m", "kvmtrace", "replay", "--json", str(run.path)],
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--vcpus", default="1,2", help="comma-separated vCPU counts")
    ap.add_argument("--seconds", type=int, default=2, help="calc-time (default 2)")
    args = ap.parse_args()
    failed = 0
    total = 0
    for vcpus in (int(v) for v in args.vcpus.split(",")):
        for i in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="kvmtrace-soak-qemu-") as tmp:
                try:
                    ok, line = one_run(vcpus, args.seconds, Path(tmp))
                except Exception as err:  # one failed run is a result, not the end
                    ok, line = False, f"error: {err}"
            total += 1
            failed += not ok
            print(f"{vcpus} vCPU run {i + 1}: {'ok' if ok else 'FAIL'}: {line}", flush=True)
    print(f"{total} runs, {failed} outside 1 %")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
