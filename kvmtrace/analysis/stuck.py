"""Stuck dirty rings: the rules ``top`` (screen, JSON, Prometheus) and ``record`` share.
The reasons' names and :data:`STUCK_EXITS` are in :mod:`kvmtrace.core.counters`.

A ring (``struct kvm_dirty_ring`` of one vCPU) is flagged *stuck* for one of these reasons,
most serious first:

``stranded``
    A ``kvm_dirty_ring_reset`` walk advanced a whole lap (``size`` entries) while
    ``dirty_index`` was past the new ``reset_index``: after an overflow the harvest collected
    a full lap, and the walk (virt/kvm/dirty_ring.c ``kvm_dirty_ring_reset()``, which stops
    at the first entry without ``KVM_DIRTY_GFN_F_RESET``: so since the dirty ring came in,
    Linux 5.11, through 6.18 here) ended on the entry it had cleared first. A VMM harvesting by
    index finds nothing from there on and no reset moves ``reset_index``: every later push
    is stranded (never harvested, never reset) and the vCPU livelocks on soft-full exits.
``no_reset_progress``
    :data:`STUCK_EXITS` or more soft-full exits (``KVM_EXIT_DIRTY_RING_FULL``) since the
    ring's ``reset_index`` last moved: the VMM harvests nothing (QEMU after an overflow).
``overflow``
    Entries were overwritten (a push with ``dirty_index - reset_index > size``): dirty
    pages were lost, whether or not the ring recovered.

Counts are ring entries (16-byte ``struct kvm_dirty_gfn``); indices are free-running u32.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..core.counters import NO_RESET_PROGRESS, OVERFLOW, REASONS, STRANDED, STUCK_EXITS
from ..core.events import Kind
from ..core.kvm_abi import entries_from_bytes, s32, u32

__all__ = ["worst", "EventStuck"]



def worst(reasons: Iterable[str | None]) -> str | None:
    """The most serious of ``reasons`` (None when there is none)."""
    got = set(reasons)
    return next((r for r in REASONS if r in got), None)


@dataclass
class _Ring:
    reset: int | None = None  # reset_index after the last reset seen (None: unknown)
    exits: int = 0  # soft-full exits since reset_index last moved
    reason: str | None = None


#: by kind (u8): the events EventStuck looks at
_WATCHED = np.zeros(256, bool)
_WATCHED[[Kind.RESET, Kind.EXIT, Kind.RING_SIZE]] = True


class EventStuck:
    """The same flags from an event stream (``kvmtrace record``): per ring, at each reset
    its advance and overflow (as ``top --light`` works them out from a reset's indices),
    and the soft-full exits since the reset index last moved. Only resets and exits are
    looked at, so the cost does not grow with the push rate."""

    def __init__(self) -> None:
        self.rings: dict[tuple[int, int, int], _Ring] = {}
        self.sizes: dict[tuple[int, int], int] = {}  # (pid, vm) -> entries

    def feed(self, batch: np.ndarray) -> None:
        """One batch of EVENT_DTYPE events, in the order the kernel emitted them."""
        sel = batch[_WATCHED[batch["kind"]]]  # one pass over the kinds (a push-rate cost)
        for e in sel.tolist():  # (ts, value, pid, tid, dirty, reset, slot, ring, vm, kind, pad)
            _ts, value, pid, _tid, dirty, reset, _slot, ring, vm, kind = e[:10]
            if kind == Kind.RING_SIZE:
                self.sizes[(pid, vm)] = entries_from_bytes(value)
                continue
            r = self.rings.setdefault((pid, vm, ring), _Ring())
            if r.reset is None and (pid, vm) in self.sizes:
                r.reset = 0  # a VM created while tracing: its rings start at index 0
            if kind == Kind.EXIT:
                r.exits += 1
                if r.exits >= STUCK_EXITS:
                    r.reason = worst([r.reason, NO_RESET_PROGRESS])
                continue
            size = self.sizes.get((pid, vm))
            if r.reset is not None and size:
                advance = u32(reset - r.reset)
                if s32(dirty - r.reset) > size:
                    r.reason = worst([r.reason, OVERFLOW])
                if advance == size and s32(dirty - reset) > 0:
                    r.reason = worst([r.reason, STRANDED])
            if r.reset is None or reset != r.reset:
                r.exits = 0
            r.reset = reset

    def stuck(self) -> dict[tuple[int, int, int], str]:
        """(pid, vm, ring) -> reason, for the rings flagged so far."""
        return {k: r.reason for k, r in self.rings.items() if r.reason}
