#!/usr/bin/env python3
"""Repeat tests/test_qemu_livelock_kvm.py's scenario: start QEMU (1 vCPU,
``dirty-ring-size=1024``) on a guest that never exits on its own, record it and watch it
with ``top -b --json --prometheus`` while ``calc-dirty-rate`` turns dirty logging on,
and count the starts whose ring overflowed (and livelocked). For each overflow, print
what :func:`kvmtrace.testing.qemu_livelock.livelock_failures` finds (nothing when
replay, top and Prometheus agree with QEMU's own trace), top's stuck reason, QEMU's dirty
rate and the soft-full exits. Root only.

    .venv/bin/python tools/soak_qemu_livelock.py [--runs 20] [--ring-entries 1024]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _common import kvmtrace_cmd, parser, soak_runs

from kvmtrace.core.counters import REASONS
from kvmtrace.testing.qemu_livelock import (
    livelock_attempt,
    livelock_failures,
    top_reason,
)


def replay(path: Path, *extra: str) -> str:
    return subprocess.run(kvmtrace_cmd("replay", *extra, str(path)),
                          capture_output=True, text=True, timeout=300).stdout


def one_run(ring_entries: int, tmp: Path) -> tuple[bool, bool, str]:
    run = livelock_attempt(tmp, ring_entries=ring_entries)
    report = json.loads(replay(run.path, "--json"))
    first = {}
    for a in report["anomalies"]:
        first.setdefault(a["kind"], a)
    rings = [(r["pushes"], r["soft_full_exits"], r["overwritten"], r["stranded"])
             for r in report["rings"]]
    line = (f"QEMU {run.rate.vcpu_dirty_rate} MB/s; rings (pushes, exits, overwritten, "
            f"stranded) {rings}; anomalies {sorted(first)}")
    if "overflow" not in first:
        return False, True, line
    bad = livelock_failures(run, report, replay(run.path), REASONS)
    at = first["overflow"]["time_s"]
    line += f"; overflow at +{at}s, top: {top_reason(run, first['overflow']['time'])}"
    return True, not bad, line + ("; " + "; ".join(bad) if bad else "")


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--ring-entries", type=int, default=1024)
    args = ap.parse_args()
    hits = []

    def one(tmp: Path) -> tuple[bool, str]:
        hit, ok, line = one_run(args.ring_entries, tmp)
        hits.append(hit)
        return ok, f"{'overflow' if hit else 'no overflow'}: {line}"

    failed = soak_runs("", args.runs, one)
    print(f"{args.runs} QEMU starts, {sum(hits)} overflowed, {failed} failed")
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
