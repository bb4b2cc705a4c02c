#!/usr/bin/env python3
"""Repeat tests/test_qemu_migrate_kvm.py's scenario: a traced QEMU live migration against
QEMU's own ``query-migrate``.

Each run boots QEMU (``-accel kvm,dirty-ring-size=4096``) on the generated multiboot guest
(4096 pages per vCPU, an ``out`` every 16 writes), records it with ``kvmtrace record -p``
while it migrates to ``exec:cat > /dev/null`` at ``--bandwidth`` MiB/s (not converging
until ``downtime-limit`` is raised after ``--syncs`` syncs; ``pause-before-switchover``
gives QEMU's exact live sync count), replays the recording and prints QEMU's live and
final ``dirty-sync-count`` and the entries each of its syncs reaped (QEMU's own trace),
the syncs replay shows, pages per iteration and replay's verdict. A run fails on anything
:func:`kvmtrace.testing.qemu_migrate.migration_failures` finds. Root only.

    .venv/bin/python tools/soak_qemu_migrate.py [--runs 20] [--vcpus 1,2] [--bandwidth 32]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _common import kvmtrace_cmd, parser, soak_runs

from kvmtrace.testing.qemu import Qemu
from kvmtrace.testing.qemu_migrate import migration_failures, record_migration
from kvmtrace.testing.qemu_trace import read_trace, trace_args
from kvmtrace.vmm.multiboot import MultibootGuest

PAGES = 4096


def one_run(vcpus: int, bandwidth_mib: int, syncs: int, tmp: Path) -> tuple[bool, str]:
    guest = MultibootGuest(vcpus=vcpus, pages=PAGES, exit_every=16)
    log = tmp / "qemu-trace.log"
    with Qemu(guest, ring_entries=4096, name=f"soak-migrate{vcpus}",
              extra_args=trace_args(log)) as qemu:
        qemu.wait_guest()
        run = record_migration(qemu, tmp / "mig.kvt", bandwidth=bandwidth_mib << 20,
                               syncs_before_converge=syncs)
    p = subprocess.run(kvmtrace_cmd("replay", "--json", str(run.path)),
                       capture_output=True, text=True, timeout=300)
    report = json.loads(p.stdout)
    qtrace = read_trace(log)
    bad = migration_failures(run, report, qtrace, vcpus, PAGES)
    migs = report["migrations"]
    shown = [m["syncs"] for m in migs]
    pages = [it["pages"] for m in migs for it in m["iterations"]]
    verdict = migs[0]["verdict"] if len(migs) == 1 else "-"
    line = (f"QEMU live {run.live_sync_count} final {run.sync_count} syncs, reaped "
            f"{[s.reaped for s in qtrace.syncs]}; replay {shown} syncs, pages {pages}, "
            f"lost {report['lost']}: {verdict}")
    return not bad and report["lost"] == 0, line + ("; " + "; ".join(bad) if bad else "")


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--vcpus", default="1,2", help="comma-separated vCPU counts")
    ap.add_argument("--bandwidth", type=int, default=32, help="max-bandwidth, MiB/s")
    ap.add_argument("--syncs", type=int, default=4, help="syncs before it may converge")
    args = ap.parse_args()
    counts = [int(v) for v in args.vcpus.split(",")]
    runs = iter(range(args.runs))

    def one(tmp: Path) -> tuple[bool, str]:
        vcpus = counts[next(runs) % len(counts)]
        ok, line = one_run(vcpus, args.bandwidth, args.syncs, tmp)
        return ok, f"{vcpus} vCPU: {line}"

    failed = soak_runs("", args.runs, one)
    print(f"{args.runs} runs, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
