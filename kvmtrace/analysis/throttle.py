"""A soft-full stall split into the harvest and what the VMM did after it (QEMU's dirty
limit throttle).

A STALL event spans a vCPU thread's return from ``KVM_RUN`` with
``KVM_EXIT_DIRTY_RING_FULL`` to its next ``KVM_RUN`` (``ts`` = the re-entry, ``value`` =
ns). QEMU 7.2 handles that exit (accel/kvm/kvm-all.c ``kvm_cpu_exec``) by taking the BQL,
reaping (under a dirty limit only its own ring) and resetting (``KVM_RESET_DIRTY_RINGS``,
a RESET_LAT event of the same thread: ``ts`` = the ioctl's end), dropping the BQL and then,
with ``set-vcpu-dirty-limit`` on, ``dirtylimit_vcpu_execute`` sleeps the thread for its
``throttle_us_per_full`` (softmmu/dirtylimit.c) before it re-enters. So a stall holding a
reset of its own thread splits soundly at that reset's end:

- *harvest*: stall start to the end of the thread's last reset inside the stall (BQL wait,
  reap, reset);
- *after reset*: from there to the re-entry: the BQL release and, under a dirty limit,
  the throttle sleep (without one it is microseconds).

A stall without a reset of its own thread (its reap collected nothing: another thread had
harvested the ring) cannot be split: it is counted apart (``unsplit``). A throttle sleep
in such a stall is not told apart from waiting. Times are ns of CLOCK_MONOTONIC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.events import Kind

__all__ = ["StallSplit", "stall_splits", "THROTTLED_NS"]

#: an after-reset tail this long or longer is counted as a throttled stall (the BQL
#: release alone takes microseconds; QEMU's dirty-limit sleeps are milliseconds)
THROTTLED_NS = 1_000_000


@dataclass(frozen=True)
class StallSplit:
    """The soft-full stalls of one vCPU ring of VM ``vm`` of ``pid``."""

    pid: int
    vm: int
    ring: int
    stalls: int
    stall_ns: int
    harvest_ns: int  #: split stalls: start to the end of the thread's own reset
    after_reset_ns: int  #: split stalls: the reset's end to the re-entry (throttle sleep)
    unsplit: int  #: stalls without a reset of their own thread
    unsplit_ns: int
    throttled: int  #: split stalls whose after-reset tail is >= THROTTLED_NS
    tails_ns: tuple[int, ...] = ()  #: every split stall's after-reset tail, in time order


def stall_splits(ev: np.ndarray) -> list[StallSplit]:
    """One :class:`StallSplit` per ring with STALL events in ``ev`` (EVENT_DTYPE)."""
    stalls = ev[ev["kind"] == Kind.STALL]
    lats = ev[ev["kind"] == Kind.RESET_LAT]
    out = []
    keys = sorted(set(zip(stalls["pid"].tolist(), stalls["vm"].tolist(),
                          stalls["ring"].tolist(), strict=True)))
    for pid, vm, ring in keys:
        mine = stalls[(stalls["pid"] == pid) & (stalls["vm"] == vm) & (stalls["ring"] == ring)]
        mine = mine[np.argsort(mine["ts"], kind="stable")]
        harvest = after = unsplit = unsplit_ns = throttled = 0
        tails = []
        for s in mine:
            end, dur, tid = int(s["ts"]), int(s["value"]), int(s["tid"])
            own = lats["ts"][(lats["tid"] == tid) & (lats["pid"] == pid)
                             & (lats["ts"] >= end - dur) & (lats["ts"] <= end)]
            if not len(own):
                unsplit += 1
                unsplit_ns += dur
                continue
            tail = end - int(own.max())
            tails.append(tail)
            after += tail
            harvest += dur - tail
            throttled += tail >= THROTTLED_NS
        out.append(StallSplit(pid, vm, ring, len(mine), int(mine["value"].sum()), harvest,
                              after, unsplit, unsplit_ns, throttled, tuple(tails)))
    return out
