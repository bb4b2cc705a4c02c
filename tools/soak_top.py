#!/usr/bin/env python3
"""Repeat live ``top``'s racy scenarios against the built-in VMM and count mismatches.

Scenarios (each run is compared with the VMM's own ground truth):

  overflow-full, overflow-light   ``top -b --json [--light] -- workload --pages 300
                                  --exit-every 0`` (256-entry ring): lost == lost_suspected,
                                  stuck exactly when pages were lost
  livelock-full, livelock-light   the same with --pages 3000: the VMM livelocks after the
                                  overflow; lost == lost_suspected and the ring is stuck
  livelock4-full, livelock4-light the same with 4 vCPUs, per ring
  slots                           cycles of 4 VMs x 5 vCPUs through 4 push slots under a
                                  snapshot loop: pushes per ring never go back and end
                                  equal to the VMM's; "retries" = snapshots read again
                                  because a slot changed owner meanwhile
  rings1200                       30 VMs x 40 vCPUs (6 cycles of 5 at once) with the default
                                  1024 slots: exact pushes per ring, never going back
  cleanup                         an exited VMM leaves no map entries (rows, VMs, vCPU fds,
                                  slots, threads)

Prints one line per scenario: runs, mismatches (and the first mismatch seen). Root only.

    .venv/bin/python tools/soak_top.py [--runs 20] [--only slots,cleanup]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

from _common import ROOT, kvmtrace_cmd, parser, repeat

from kvmtrace.bpf.loader import Probes
from kvmtrace.bpf.snapshot_source import LiveSource
from kvmtrace.testing.held import release
from kvmtrace.testing.snapshot_watch import (
    plan,
    snapshot_mismatch,
    start_cycles,
    watch_cycles,
)


def overflow(pages: int, light: bool, vcpus: int = 1) -> str | None:
    mode = ["--light"] if light else []
    proc = subprocess.run(kvmtrace_cmd("top", "-b", "--json", *mode, "-d", "0.5", "--",
                                       *kvmtrace_cmd("workload", "--vcpus", str(vcpus),
                                                     "--ring-bytes", "4096", "--pages",
                                                     str(pages), "--exit-every", "0",
                                                     "--json")),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    if proc.returncode != 0:
        return f"top exited {proc.returncode}: {proc.stderr[-200:]}"
    truth = json.loads(proc.stderr)
    rings = {r["index"]: r for r in json.loads(proc.stdout.splitlines()[-1])["rings"]}
    for t in truth["rings"]:
        r = rings.get(t["index"], {"lost": 0, "pushes": 0, "stuck": False, "stuck_reason": None})
        want_stuck = bool(t["lost_suspected"] or t["livelock"])
        if (r["lost"], r["pushes"], r["stuck"]) != (t["lost_suspected"], t["pages_written"],
                                                     want_stuck):
            return (f"ring {t['index']}: lost {r['lost']} vs {t['lost_suspected']}, pushes "
                    f"{r['pushes']} vs {t['pages_written']}, stuck {r['stuck']} "
                    f"({r['stuck_reason']}) vs {want_stuck}")
    return None


def slots(stats: Counter, vms: int = 4, vcpus: int = 5, cycles: int = 3, pages: int = 300,
          bits: int | None = 2) -> str | None:
    truths, snaps, probes = watch_cycles(plan(vms, vcpus, cycles, pages), push_slot_bits=bits)
    with probes:
        stats["snapshots"] += len(snaps)
        stats["retries"] += probes.snapshot_retries
    return snapshot_mismatch(truths, snaps)


def cleanup() -> str | None:
    child = start_cycles(plan(2, 3, 1))
    with LiveSource(probes=Probes(pid=child.pid), watch=True) as source:
        release(child)
        time.sleep(0.2)
        source.snapshot()
        source.snapshot()
        left = source.probes.map_sizes()
    return None if not any(left.values()) else f"left behind: {left}"


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--only", default="", help="comma-separated scenario names")
    args = ap.parse_args()
    stats: Counter = Counter()
    scenarios = {
        "overflow-full": lambda: overflow(300, False),
        "overflow-light": lambda: overflow(300, True),
        "livelock-full": lambda: overflow(3000, False),
        "livelock-light": lambda: overflow(3000, True),
        "livelock4-full": lambda: overflow(3000, False, 4),
        "livelock4-light": lambda: overflow(3000, True, 4),
        "slots": lambda: slots(stats),
        "rings1200": lambda: slots(stats, 5, 40, 6, 100, None),
        "cleanup": cleanup,
    }
    only = [s for s in args.only.split(",") if s]
    for name, fn in scenarios.items():
        if only and name not in only:
            continue
        out = repeat(fn, args.runs)
        extra = (f"  snapshots {stats['snapshots']} retries {stats['retries']}"
                 if name in ("slots", "rings1200") else "")
        stats.clear()
        print(f"{name:15} runs {args.runs:3}  mismatches {len(out.failures):3}  "
              f"{out.seconds:6.1f} s{extra}" + (f"  first: {out.first}" if out.first else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
