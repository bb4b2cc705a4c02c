"""QEMU's per-vCPU dirty limit as a test peer: ``set-vcpu-dirty-limit`` while kvmtrace
records, with QEMU's own trace (:mod:`.qemu_trace`) for ground truth.

QEMU 7.2 (softmmu/dirtylimit.c) measures each vCPU's dirty rate once a second (a thread
of its own that syncs the rings like ``calc-dirty-rate``) and, while a vCPU is above its
limit (MB/s), sleeps its thread after every soft-full exit's reap
(``dirtylimit_vcpu_execute``: ``throttle_us_per_full``); the reaper stops reaping while a
limit is in service, so every soft-full exit reaps and resets the vCPU's own ring.
:func:`record_dirty_limit` sets the limit on every vCPU for ``seconds``, cancels it and
stops the recording; :func:`dirty_limit_failures` holds ``replay --json`` to QEMU's trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .qemu import Qemu
from .qemu_migrate import start_recorder, stop_recorder

__all__ = ["DirtyLimitRun", "record_dirty_limit", "dirty_limit_failures"]


@dataclass(frozen=True)
class DirtyLimitRun:
    path: Path
    pid: int
    limit_mbps: int
    answer: list[dict[str, Any]]  #: query-vcpu-dirty-limit just before cancelling


def record_dirty_limit(qemu: Qemu, out: Path, limit_mbps: int = 100,
                       seconds: float = 4.0) -> DirtyLimitRun:
    """Record ``qemu`` while every vCPU is limited to ``limit_mbps`` for ``seconds``."""
    assert qemu.qmp is not None, "QEMU not started"
    rec = start_recorder(qemu.pid, out)
    try:
        qemu.qmp.execute("set-vcpu-dirty-limit", {"dirty-rate": limit_mbps})
        time.sleep(seconds)
        answer = qemu.qmp.execute("query-vcpu-dirty-limit")
        qemu.qmp.execute("cancel-vcpu-dirty-limit")
        time.sleep(0.3)  # a vCPU asleep in its throttle wakes and re-enters
    finally:
        stop_recorder(rec)
    return DirtyLimitRun(out, qemu.pid, limit_mbps, answer)


def dirty_limit_failures(run: DirtyLimitRun, report: dict[str, Any], qtrace: Any,
                         vcpus: int) -> list[str]:
    """What ``replay --json`` gets wrong (empty: nothing). Exactly, per vCPU: soft-full
    exits are QEMU's ``kvm_dirty_ring_full``; stalls are the exits and every one splits
    (QEMU resets the vCPU's own ring after each); the stalls with a throttle tail
    (``throttled``) are QEMU's ``dirtylimit_vcpu_execute`` sleeps."""
    bad = []
    rings = {r["index"]: r for r in report["rings"] if r["pid"] == run.pid}
    split = {s["index"]: s for s in report["stall_split"] if s["pid"] == run.pid}
    for i in range(vcpus):
        exits = qtrace.full_exits.get(i, 0)
        sleeps = len(qtrace.throttle_sleeps.get(i, []))
        r, s = rings.get(i), split.get(i)
        if r is None or s is None:
            bad.append(f"vCPU {i}: no ring or stall split in replay")
            continue
        got = (r["soft_full_exits"], s["stalls"], s["unsplit"], s["throttled"])
        if got != (exits, exits, 0, sleeps):
            bad.append(f"vCPU {i}: (exits, stalls, unsplit, throttled) {got}, QEMU: "
                       f"{exits} soft-full exits, {sleeps} throttle sleeps")
    return bad
