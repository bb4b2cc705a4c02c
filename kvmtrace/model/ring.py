"""A userspace model of ``struct kvm_dirty_ring`` (virt/kvm/dirty_ring.c), one vCPU's ring.

The ABI facts it uses (sizes, reserves, flags, u32 arithmetic) live in
:mod:`kvmtrace.core.kvm_abi`. This is the reference semantics the replay
(:mod:`kvmtrace.analysis.replay`) is tested against. It is plain Python, one operation
per call, and follows the kernel:

- ``size`` is in entries of ``struct kvm_dirty_gfn`` (16 bytes: u32 flags, u32 slot,
  u64 offset), a power of two; KVM takes ring *bytes* in ``KVM_ENABLE_CAP`` (at least one
  page, at most ``KVM_DIRTY_RING_MAX_ENTRIES`` = 65536 entries).
- ``soft_limit = size - kvm_dirty_ring_get_rsvd_entries()``, the reserve being
  ``KVM_DIRTY_RING_RSVD_ENTRIES`` (64) plus ``kvm_cpu_dirty_log_size()`` (0 here; the PML
  buffer, 512, on Intel hosts with PML: 576 in all).
- ``used = dirty_index - reset_index`` (free-running u32 counters); soft-full is
  ``used >= soft_limit``, full is ``used >= size``.
- push: write slot/offset at ``dirty_index & (size - 1)``, set flags = DIRTY, then
  ``dirty_index++``, then the ``kvm_dirty_ring_push`` tracepoint fires (so it shows the
  incremented index). A push into a full ring is not refused: the kernel only
  ``WARN_ON_ONCE``s and the oldest unharvested entry is overwritten (a dirty page lost).
- since Linux 6.1 the push itself raises ``KVM_REQ_DIRTY_RING_SOFT_FULL`` when soft-full;
  the vCPU exits with ``KVM_EXIT_DIRTY_RING_FULL`` (31, tracepoint ``kvm_dirty_ring_exit``)
  at its next guest entry if the ring is still soft-full then. 5.11-6.0 checked
  ``kvm_dirty_ring_soft_full()`` directly at guest entry: the same observable behaviour.
  Either way a guest that never leaves guest mode keeps pushing past the soft limit.
- harvest (userspace): the VMM reads entries with the DIRTY flag and sets RESET on them.
- reset (``KVM_RESET_DIRTY_RINGS``, per ring): collect consecutive RESET-flagged entries
  from ``reset_index``, clear their flags, ``reset_index++`` for each, then fire one
  ``kvm_dirty_ring_reset`` tracepoint per ring, also when nothing was collected. Since
  6.16 the walk also stops at a pending signal (-EINTR, no tracepoint) or after INT_MAX
  entries per ioctl; before 6.16 it returned the count and could not be interrupted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.kvm_abi import (
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_GFN_F_RESET,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    soft_limit_of,
    u32,
)

__all__ = [
    "Entry",
    "DirtyRing",
    "resets_interruptible",
]


def resets_interruptible(kernel_release: str | None) -> bool:
    """Whether ``KVM_RESET_DIRTY_RINGS`` on this kernel can stop part-way with -EINTR and
    no ``kvm_dirty_ring_reset`` event for the ring it was walking (Linux 6.16 and later;
    the VMM retries). True when the release is unknown (text traces)."""
    m = re.match(r"(\d+)\.(\d+)", kernel_release or "")
    return m is None or (int(m[1]), int(m[2])) >= (6, 16)


@dataclass
class Entry:
    """``struct kvm_dirty_gfn``: flags (DIRTY/RESET bits), slot (as_id << 16 | id), offset
    (page within the memslot)."""

    flags: int = 0
    slot: int = 0
    offset: int = 0


class DirtyRing:
    """``struct kvm_dirty_ring`` of one vCPU: dirty_index, reset_index, size, soft_limit,
    index and the entries (``dirty_gfns``).

    ``fill_slot`` is the slot of never-written entries (the kernel's ``vzalloc`` gives 0;
    the replay uses :data:`~kvmtrace.core.kvm_abi.UNKNOWN_SLOT` so that reading one is
    recognisable).
    """

    def __init__(
        self,
        size: int,
        index: int = 0,
        reserved: int = KVM_DIRTY_RING_RSVD_ENTRIES,
        *,
        fill_slot: int = 0,
    ) -> None:
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two, not {size}")
        self.size = size
        self.soft_limit = soft_limit_of(size, reserved)
        self.index = index
        self.dirty_index = 0
        self.reset_index = 0
        self.entries = [Entry(0, fill_slot, 0) for _ in range(size)]
        #: the VMM's own harvest cursor (userspace state, not in the kernel struct)
        self.fetch_index = 0

    # -- kernel side -----------------------------------------------------------------
    @property
    def used(self) -> int:
        """``kvm_dirty_ring_used()``: entries pushed and not yet reset."""
        return u32(self.dirty_index - self.reset_index)

    def soft_full(self) -> bool:
        """``kvm_dirty_ring_soft_full()``."""
        return self.used >= self.soft_limit

    def full(self) -> bool:
        """``kvm_dirty_ring_full()``: the next push overwrites an unharvested entry."""
        return self.used >= self.size

    def entry_at(self, index: int) -> Entry:
        """The entry a free-running index maps to (``index & (size - 1)``)."""
        return self.entries[index & (self.size - 1)]

    def push(self, slot: int, offset: int) -> Entry | None:
        """``kvm_dirty_ring_push()``. Returns a copy of the entry it overwrote when that one
        was still live (flags set: pushed and not yet collected by a reset), else None."""
        e = self.entry_at(self.dirty_index)
        lost = Entry(e.flags, e.slot, e.offset) if e.flags else None
        e.slot, e.offset, e.flags = slot, offset, KVM_DIRTY_GFN_F_DIRTY
        self.dirty_index = u32(self.dirty_index + 1)
        return lost

    def reset(self) -> list[tuple[int, int]]:
        """``kvm_dirty_ring_reset()``: collect consecutive RESET-flagged entries from
        reset_index; returns their (slot, offset) in ring order. At most ``size`` entries
        can be flagged, so the walk ends by itself."""
        out: list[tuple[int, int]] = []
        while True:
            e = self.entry_at(self.reset_index)
            if not e.flags & KVM_DIRTY_GFN_F_RESET:
                return out
            out.append((e.slot, e.offset))
            e.flags = 0
            self.reset_index = u32(self.reset_index + 1)

    # -- userspace side --------------------------------------------------------------
    def harvest(self, limit: int | None = None) -> list[tuple[int, int]]:
        """What a VMM does (QEMU's ``kvm_dirty_ring_reap_one``): from its fetch cursor,
        read DIRTY entries in order and replace their flags by RESET ("collected"), at
        most ``limit`` and at most one lap. Returns the (slot, offset) read."""
        out: list[tuple[int, int]] = []
        cap = self.size if limit is None else min(limit, self.size)
        while len(out) < cap:
            e = self.entry_at(self.fetch_index)
            if not e.flags & KVM_DIRTY_GFN_F_DIRTY:
                break
            e.flags = KVM_DIRTY_GFN_F_RESET
            out.append((e.slot, e.offset))
            self.fetch_index = u32(self.fetch_index + 1)
        return out

    def mark_reset(self, start: int, count: int) -> None:
        """Set RESET on the ``count`` entries from index ``start``, whatever their flags
        (a VMM that marks entries it never read, e.g. beyond dirty_index, does this)."""
        for k in range(min(count, self.size)):
            self.entry_at(start + k).flags |= KVM_DIRTY_GFN_F_RESET
