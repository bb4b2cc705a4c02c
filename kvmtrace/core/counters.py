"""Per-ring and per-VM counters, the common currency of every view.

A :class:`Snapshot` holds cumulative counters since the source started in two tables:

- per ring (``struct kvm_dirty_ring`` of one vCPU), keyed by :class:`RingKey` (VMM pid, VM
  file descriptor in that process, ring index = vCPU index): :class:`RingCounters`;
- per VM (``struct kvm``), keyed by :class:`VmKey` (VMM pid, VM file descriptor):
  :class:`VmCounters`, what belongs to the whole VM rather than to one of its rings (the
  ``KVM_RESET_DIRTY_RINGS`` vm ioctl resets every ring of the VM at once), and
  :class:`VmInfo`, who the VM is.

Views take two snapshots and derive rates and percentiles themselves; sources never
compute rates.

Histograms are log2 buckets of nanoseconds: bucket i counts values v with
``2**i <= v < 2**(i+1)`` (bucket 0 also holds 0), :data:`HIST_BUCKETS` of them, matching
the BPF side's ``bpf_log2l`` buckets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from .kvm_abi import u32

__all__ = ["HIST_BUCKETS", "STRANDED", "NO_RESET_PROGRESS", "OVERFLOW", "REASONS", "STUCK_EXITS",
           "RingKey", "RingCounters", "VmKey", "VmCounters", "VmName", "VmInfo", "Snapshot",
           "hist_percentile"]

HIST_BUCKETS = 40

#: why a ring is flagged stuck (RingCounters.stuck); the rules: kvmtrace.analysis.stuck
STRANDED = "stranded"
NO_RESET_PROGRESS = "no_reset_progress"
OVERFLOW = "overflow"
#: reason -> one-line explanation, most serious first
REASONS = {
    STRANDED: "a reset stopped on an entry it cleared after an overflow: pushes are stranded",
    NO_RESET_PROGRESS: "soft-full exits keep coming and the reset index does not move",
    OVERFLOW: "the ring overflowed: entries were overwritten before a reset",
}
#: soft-full exits without reset progress that make a ring stuck (the built-in VMM's own
#: livelock test: kvmtrace.vmm.workload.LIVELOCK_EXITS)
STUCK_EXITS = 3


class RingKey(NamedTuple):
    pid: int
    vm: int  # VM fd in the VMM process; -1 unknown
    ring: int  # kvm_dirty_ring.index (vCPU index); -1 unknown (text traces)


class VmKey(NamedTuple):
    """One VM (``struct kvm``): the VMM's pid and the VM's fd in it (packed with its
    generation, :func:`~kvmtrace.core.kvm_abi.vm_fd`/``vm_gen``; -1 unknown). Equal to the
    plain tuple ``(pid, vm)`` and to a :class:`RingKey`'s first two fields."""

    pid: int
    vm: int


@dataclass
class RingCounters:
    """Cumulative counters of one ring (struct kvm_dirty_ring), all since the source began."""

    pushes: int = 0
    resets: int = 0  # kvm_dirty_ring_reset events (one per ring per KVM_RESET_DIRTY_RINGS)
    entries_reset: int = 0  # sum of reset_index advances
    soft_full_exits: int = 0
    dirty_index: int = 0  # last seen (free-running u32)
    reset_index: int = 0
    max_used: int = 0  # max over time of dirty_index - reset_index
    lost: int = 0  # lost pages: overwritten (pushed beyond size) + stranded entries
    stranded: int = 0  # of lost: pushed after a reset left the ring stuck (overflow aftermath)
    stuck: str | None = None  # why the ring is flagged stuck (kvmtrace.analysis.stuck), or None
    size: int | None = None  # entries; None = unknown
    stall_hist: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)
    stall_ns: int = 0  # total

    @property
    def used(self) -> int:
        return u32(self.dirty_index - self.reset_index)


@dataclass(frozen=True)
class VmName:
    """What a VMM process's command line says of its VM (kvmtrace.host.vmnames): ``vmm``
    (its kind: "qemu", "libvirt", "firecracker", "cloud-hypervisor", "kvmtrace" or None),
    ``name`` (QEMU -name guest=, libvirt domain, Firecracker --id, ...; None unknown) and
    ``comm`` (the kernel's task name of the process; "" unknown)."""

    vmm: str | None = None
    name: str | None = None
    comm: str = ""


@dataclass
class VmCounters:
    """Cumulative counters of one VM (``struct kvm``), all since the source began.

    ``KVM_RESET_DIRTY_RINGS`` is a vm ioctl: one call resets every vCPU's ring of the VM
    (one ``kvm_dirty_ring_reset`` per ring, counted in :attr:`RingCounters.resets`), so
    its count and duration belong to the VM, not to a ring. Durations are ns, from the
    ioctl's entry to its return; the histogram is log2 buckets (:data:`HIST_BUCKETS`).
    """

    reset_ioctls: int = 0  # completed KVM_RESET_DIRTY_RINGS ioctls
    reset_ns: int = 0  # their total duration, ns
    reset_lat_hist: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)


@dataclass
class VmInfo:
    pid: int
    vm: int
    comm: str = ""
    name: str | None = None  # QEMU -name, cloud-hypervisor/firecracker id, ...
    ring_bytes: int | None = None
    vmm: str | None = None  # VMM kind, see VmName


@dataclass
class Snapshot:
    time_ns: int  # CLOCK_MONOTONIC of the snapshot (live) or of the last event (files)
    rings: dict[RingKey, RingCounters] = field(default_factory=dict)
    vms: dict[tuple[int, int], VmInfo] = field(default_factory=dict)  # VmKey -> who
    vm_counters: dict[VmKey, VmCounters] = field(default_factory=dict)
    lost_events: int = 0  # events the kernel side could not deliver or count


def hist_percentile(hist: list[int], q: float) -> int | None:
    """Upper bound (ns) of the log2 bucket holding quantile q (0..1); None if empty."""
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank and n:
            return 1 << (i + 1)
    return 1 << len(hist)
