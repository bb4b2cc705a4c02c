"""What one KVM_RESET_DIRTY_RINGS call did to each ring, read back from the rings.

The kernel walks a VM's vCPUs in index order; in each ring it clears (flags = 0) the entries
from its ``reset_index`` on while they carry KVM_DIRTY_GFN_F_RESET, and ends the ring with
one ``kvm_dirty_ring_reset`` tracepoint. Since Linux 6.16 it checks ``signal_pending()``
before every entry: a signal ends the whole call there, with no tracepoint for the
interrupted ring, the later rings not visited, and the ioctl still returning the entries
reset so far (virt/kvm/dirty_ring.c and kvm_main.c, 6.16-6.18). The entries a VMM has
harvested but the kernel has not reset yet are its *pending* range, ``fetch - pending`` ..
``fetch - 1``; after a call their flags say exactly how far the kernel got:

- 0: reset (cleared);
- RESET (2): not reset. The kernel stops only at an entry without the RESET flag, so a
  ring whose walk left a harvested entry behind a reset one was stopped by a signal;
- DIRTY (1): pushed again on top of a harvested entry (the ring was over-full). Before
  the first RESET left, it is where the kernel's walk ended (the overwrite came first);
  with no RESET left at all, the kernel reset the whole range and the push came after.

A signal that lands after a ring's last pending entry leaves no trace in the flags (the
entries are all reset; only that ring's tracepoint and the later rings' are missing), so it
cannot be counted; every other interrupted call is.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kvm import KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET
from .vm import DirtyRing

__all__ = ["RingReset", "CallOutcome", "ring_reset", "attribute_reset"]


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


def ring_reset(ring: DirtyRing, pending: int) -> RingReset:
    """Read back one ring after a call; ``pending`` entries before ``ring.fetch`` were
    RESET-flagged by the VMM and not yet reset before the call."""
    if pending <= 0:
        return RingReset(0, False)
    flags = ring.flags_range(ring.fetch - pending, min(pending, ring.entries))
    try:
        first_left = flags.index(KVM_DIRTY_GFN_F_RESET)
    except ValueError:
        return RingReset(len(flags), False)
    try:
        return RingReset(flags.index(KVM_DIRTY_GFN_F_DIRTY, 0, first_left), False)
    except ValueError:
        return RingReset(first_left, True)


def attribute_reset(rings: list[tuple[DirtyRing, int]]) -> CallOutcome:
    """Read back every ring of a VM (vCPU index order, with its pending count) after one
    KVM_RESET_DIRTY_RINGS call."""
    per_ring: list[int] = []
    cut: int | None = None
    for i, (ring, pending) in enumerate(rings):
        share = ring_reset(ring, pending)
        per_ring.append(share.reset)
        if cut is None and share.stopped_by_signal:
            cut = i
    return CallOutcome(per_ring, cut, len(rings) if cut is None else cut)
