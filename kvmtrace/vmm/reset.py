"""What one KVM_RESET_DIRTY_RINGS call did to each ring, read back from the rings.

The kernel walks a VM's vCPUs in index order; in each ring it clears (flags = 0) the entries
from its ``reset_index`` on while they carry KVM_DIRTY_GFN_F_RESET, and ends the ring with
one ``kvm_dirty_ring_reset`` tracepoint. Since Linux 6.16 it checks ``signal_pending()``
before every entry: a signal ends the whole call there, with no tracepoint for the
interrupted ring, the later rings not visited, and the ioctl still returning the entries
reset so far (virt/kvm/dirty_ring.c and kvm_main.c, 6.16-6.18).

The VMM knows where each ring's walk starts: ``reset_index`` is the number of entries the
kernel has reset in that ring so far, which the VMM counts exactly. Before a call it reads
the *run* of RESET-flagged entries from there (the most the walk can reset; a push can only
turn an entry DIRTY, never RESET); after the call the flags of that run say how far the
kernel got:

- 0: reset (cleared);
- RESET (2): not reset. The kernel stops only at an entry without the RESET flag, so a
  walk that left a RESET entry of the run behind was stopped by a signal;
- DIRTY (1): pushed on top of the entry (the ring was over-full). Before the first RESET
  left, the first DIRTY is where the walk ended (the overwrite came first); with no RESET
  left at all, the kernel reset the whole run and the pushes came after.

A signal that lands after a ring's run leaves no trace in the flags (only that ring's
tracepoint and the later rings' are missing), so it cannot be counted; every other
interrupted call is. After an overflow the walk may start on a cleared entry: the run is
empty and the ring is stuck (the kernel resets nothing there again).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.kvm_abi import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET
from .vm import MappedRing

__all__ = ["RingReset", "CallOutcome", "reset_run", "ring_reset", "attribute_reset"]


@dataclass(frozen=True)
class RingReset:
    """One ring's share of a call: entries of its pending range the kernel reset, and
    whether its walk ended on a harvested (RESET-flagged) entry, i.e. a signal stopped it."""

    reset: int
    stopped_by_signal: bool


@dataclass(frozen=True)
class CallOutcome:
    """A whole call: ``per_ring`` entries reset (vCPU order); ``interrupted_at`` the index of
    the ring a signal stopped the walk in (None: not seen interrupted); ``visited`` the rings
    whose walk completed, i.e. that got a ``kvm_dirty_ring_reset`` tracepoint."""

    per_ring: list[int]
    interrupted_at: int | None
    visited: int

    @property
    def total(self) -> int:
        return sum(self.per_ring)


def reset_run(ring: MappedRing, start: int, limit: int | None = None) -> int:
    """Consecutive RESET-flagged entries from ring index ``start`` (the kernel's
    ``reset_index``): the most one walk can reset in this ring. ``limit``: read no more
    than this many (each RESET entry is a harvested entry not reset yet, so the VMM's
    count of those bounds the run)."""
    count = ring.entries if limit is None else max(0, min(limit, ring.entries))
    flags = ring.flags_range(start, count)
    ends = []
    for other in (0, KVM_DIRTY_GFN_F_DIRTY):
        try:
            ends.append(flags.index(other))
        except ValueError:
            pass
    return min(ends, default=len(flags))


def ring_reset(ring: MappedRing, start: int, run: int) -> RingReset:
    """Read back one ring after a call whose walk started at ring index ``start`` with
    ``run`` RESET-flagged entries ahead of it."""
    if run <= 0:
        return RingReset(0, False)
    flags = ring.flags_range(start, run)
    try:
        first_left = flags.index(KVM_DIRTY_GFN_F_RESET)
    except ValueError:
        return RingReset(run, False)
    try:
        return RingReset(flags.index(KVM_DIRTY_GFN_F_DIRTY, 0, first_left), False)
    except ValueError:
        return RingReset(first_left, True)


def attribute_reset(rings: list[tuple[MappedRing, int, int]]) -> CallOutcome:
    """Read back every ring of a VM (vCPU index order; per ring its walk start and run
    before the call) after one KVM_RESET_DIRTY_RINGS call."""
    per_ring: list[int] = []
    cut: int | None = None
    for i, (ring, start, run) in enumerate(rings):
        share = ring_reset(ring, start, run)
        per_ring.append(share.reset)
        if cut is None and share.stopped_by_signal:
            cut = i
    return CallOutcome(per_ring, cut, len(rings) if cut is None else cut)
