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

from .qemu import Qemu, start_recorder, stop_recorder

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
                         events: Any, vcpus: int) -> list[str]:
    """What ``replay --json`` (and :func:`kvmtrace.analysis.throttle.stall_splits` of the
    recording's ``events``) gets wrong (empty: nothing), per vCPU.

    Exact: soft-full exits are QEMU's ``kvm_dirty_ring_full``; stalls are the exits and
    every one splits (QEMU resets the vCPU's own ring after each); taken in order, no stall
    after which QEMU did not sleep (no ``dirtylimit_vcpu_execute`` before its next exit)
    is counted throttled. A stall after which QEMU did sleep is counted throttled unless a
    signal cut the sleep below THROTTLED_NS: QEMU kicks every vCPU thread (SIG_IPI) when
    the dirty limit's rate thread syncs the rings once a second, and its trace logs the
    sleep asked for, not the sleep taken; so at most one such stall per sync of that
    thread (replay's sync threads) may be short."""
    from ..analysis.throttle import THROTTLED_NS, stall_splits

    bad = []
    rings = {r["index"]: r for r in report["rings"] if r["pid"] == run.pid}
    split = {s["index"]: s for s in report["stall_split"] if s["pid"] == run.pid}
    tails = {s.ring: s.tails_ns for s in stall_splits(events) if s.pid == run.pid}
    syncs = sum(m["syncs"] for m in report["migrations"] if m["pid"] == run.pid)
    for i in range(vcpus):
        exits = qtrace.full_exits.get(i, 0)
        slept = qtrace.exit_slept.get(i, [])
        r, s = rings.get(i), split.get(i)
        if r is None or s is None:
            bad.append(f"vCPU {i}: no ring or stall split in replay")
            continue
        got = (r["soft_full_exits"], s["stalls"], s["unsplit"], len(tails.get(i, ())))
        if got != (exits, exits, 0, exits):
            bad.append(f"vCPU {i}: (exits, stalls, unsplit, split) {got}, QEMU: {exits} "
                       "soft-full exits")
            continue
        pairs = list(zip(tails[i], slept, strict=True))
        false_throttle = [n for n, (t, q) in enumerate(pairs) if t >= THROTTLED_NS and not q]
        short = [n for n, (t, q) in enumerate(pairs) if t < THROTTLED_NS and q]
        if false_throttle or len(short) > syncs:
            bad.append(f"vCPU {i}: stalls {false_throttle} counted throttled without a QEMU "
                       f"sleep; {len(short)} slept stalls short ({syncs} syncs)")
        if s["throttled"] != sum(slept) - len(short):
            bad.append(f"vCPU {i}: throttled {s['throttled']}, QEMU slept "
                       f"{sum(slept)} times, {len(short)} cut short")
    return bad
