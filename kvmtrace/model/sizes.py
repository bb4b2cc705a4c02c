"""Where a VM's ring size comes from: the one policy, for every reader of events or maps.

A ring's size (entries of ``struct kvm_dirty_gfn``, 16 bytes each) is per VM: the VMM
sets it once with ``KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL])`` (bytes) before
creating vCPUs. Sources, highest precedence first (the ``size_source`` a replay reports):

1. ``"trace"``: what the kernel was told or holds, as the trace shows it: a
   :data:`~kvmtrace.core.events.Kind.RING_SIZE` event (the VMM's KVM_ENABLE_CAP; the latest
   one wins, sizes KVM would refuse are ignored) or, live, the ring's own
   ``struct kvm_dirty_ring.size`` and the VM's cap bytes in the BPF maps;
2. ``"meta"``: what the source states for the VM
   (:meth:`~kvmtrace.core.sources.SourceMeta.ring_size`): the sizes a recording saw, or
   for imported text the ``--ring-entries``/``--ring-bytes`` flag, a default for every VM;
3. ``"inferred"``: from the VM's first soft-full exit
   (:func:`~kvmtrace.core.kvm_abi.infer_size`), only while neither of the above is known;
4. ``"unknown"``: none yet.

:class:`RingSizes` keeps this per (pid, vm) for a replay (the fast one and the reference
one); :func:`live_ring_size` applies it to one row of the live maps. Views that only label
(exports) read :meth:`RingSizes.size` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.kvm_abi import (
    KVM_DIRTY_RING_RSVD_ENTRIES,
    RESERVES_UNKNOWN,
    entries_from_bytes,
    infer_size,
    valid_entries,
)
from ..core.sources import SourceMeta

__all__ = ["TRACE", "META", "INFERRED", "UNKNOWN", "RingSizes", "live_ring_size"]

TRACE, META, INFERRED, UNKNOWN = "trace", "meta", "inferred", "unknown"

VmKey = tuple[int, int]  # (pid, vm)


@dataclass
class RingSizes:
    """Ring size per VM by the policy of the module docstring.

    ``reserved``: the host's reserve (:func:`~kvmtrace.core.kvm_abi.infer_size`), 64 or,
    with Intel PML, 576.
    """

    meta: SourceMeta = field(default_factory=lambda: SourceMeta(kind="unknown"))
    reserved: int = KVM_DIRTY_RING_RSVD_ENTRIES
    _sizes: dict[VmKey, tuple[int, str]] = field(default_factory=dict)

    def size(self, pid: int, vm: int) -> tuple[int | None, str]:
        """(entries, source) of the VM's rings now; (None, "unknown") if not known."""
        got = self._sizes.get((pid, vm))
        if got is None:
            size = self.meta.ring_size(pid, vm)
            if size is None:
                return None, UNKNOWN
            got = self._sizes[(pid, vm)] = (size, META)
        return got

    def known(self, pid: int, vm: int) -> bool:
        return self.size(pid, vm)[0] is not None

    def from_event(self, pid: int, vm: int, ring_bytes: int) -> int | None:
        """A RING_SIZE event (``ring_bytes`` as given to KVM_ENABLE_CAP). Returns the VM's
        new size when it changes the VM's (size, source), else None (the same, or a size
        KVM refuses)."""
        size = entries_from_bytes(ring_bytes)
        if not valid_entries(size) or self.size(pid, vm) == (size, TRACE):
            return None
        self._sizes[(pid, vm)] = (size, TRACE)
        return size

    def infer(self, pid: int, vm: int, exit_used: int, max_used: int) -> int | None:
        """The VM's first soft-full exit of unknown size, at ``used = exit_used`` with
        ``max_used`` the most any of its rings held: returns the size it implies (now the
        VM's, source "inferred") or None."""
        if self.known(pid, vm):
            return None
        size = infer_size(exit_used, max_used, self.reserved)
        if size is not None:
            self._sizes[(pid, vm)] = (size, INFERRED)
        return size


def live_ring_size(ring_entries: int, cap_bytes: int, exit_used_min: int) -> int | None:
    """The size of one ring of the live maps: its ``struct kvm_dirty_ring.size`` (raw
    tracepoints read it), else the VM's KVM_ENABLE_CAP bytes, else inferred from the
    smallest ``used`` seen at a soft-full exit with the reserve unknown
    (:data:`~kvmtrace.core.kvm_abi.RESERVES_UNKNOWN`), else None. 0 means not seen."""
    return (ring_entries or entries_from_bytes(cap_bytes)
            or infer_size(exit_used_min, reserved=RESERVES_UNKNOWN))
