"""The event record every source yields: a numpy structured array of :data:`EVENT_DTYPE`.

The ``vm`` field's packing (fd and generation) and VM_UNKNOWN live in :mod:`.kvm_abi`.

The layout is the BPF side's ``struct kt_event`` (kvmtrace/bpf/probes/kvmtrace.h) byte
for byte, so records read from a BPF ring buffer are a zero-copy view. Importers of ftrace
and perf text fill the same fields they can and leave the rest at their "unknown" values.
"""

from __future__ import annotations

import enum

import numpy as np

from .kvm_abi import VM_UNKNOWN, entries_from_bytes

__all__ = [
    "EVENT_DTYPE",
    "Kind",
    "RING_UNKNOWN",
    "concat_records",
    "copy_records",
    "empty",
    "ring_sizes",
    "take_records",
    "vm_keys",
    "vm_pairs",
]


class Kind(enum.IntEnum):
    """``KT_*`` in kvmtrace/bpf/probes/kvmtrace.h."""

    PUSH = 1  #: kvm:kvm_dirty_ring_push, fired after dirty_index++
    RESET = 2  #: kvm:kvm_dirty_ring_reset, once per ring per KVM_RESET_DIRTY_RINGS
    EXIT = 3  #: kvm:kvm_dirty_ring_exit, a soft-full exit (KVM_EXIT_DIRTY_RING_FULL = 31)
    STALL = 4  #: from exit 31 reaching userspace to the vCPU's next KVM_RUN; value = ns
    RESET_LAT = 5  #: duration of one KVM_RESET_DIRTY_RINGS ioctl; value = ns
    RING_SIZE = 6  #: KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]); value = bytes, slot = cap


RING_UNKNOWN = -1

#: struct kt_event (48 bytes). ts: ns, CLOCK_MONOTONIC. value: push offset (page within
#: the slot) or a duration in ns or ring bytes, by kind. slot: ``as_id << 16 | slot id``.
EVENT_DTYPE = np.dtype(
    [
        ("ts", "<u8"),
        ("value", "<u8"),
        ("pid", "<u4"),
        ("tid", "<u4"),
        ("dirty_index", "<u4"),
        ("reset_index", "<u4"),
        ("slot", "<u4"),
        ("ring", "<i4"),
        ("vm", "<i4"),
        ("kind", "u1"),
        ("pad", "V3"),
    ]
)
assert EVENT_DTYPE.itemsize == 48


def empty(n: int = 0) -> np.ndarray:
    """n zeroed events with ``ring`` and ``vm`` set to unknown."""
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["ring"] = RING_UNKNOWN
    ev["vm"] = VM_UNKNOWN
    return ev


def _opaque(dtype: np.dtype) -> np.dtype:
    return np.dtype((np.void, dtype.itemsize))


def take_records(ev: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``ev[index]`` (fancy indexing), copied as opaque fixed-size items: numpy copies a
    structured dtype field by field, several times slower."""
    return ev.view(_opaque(ev.dtype))[index].view(ev.dtype)


def copy_records(ev: np.ndarray) -> np.ndarray:
    """A copy of ``ev``, made as of opaque fixed-size items (about 15 x faster than
    numpy's copy of a structured dtype)."""
    return ev.view(_opaque(ev.dtype)).copy().view(ev.dtype)


def concat_records(arrays: list[np.ndarray]) -> np.ndarray:
    """``arrays`` (one structured dtype) joined, copied as opaque fixed-size items."""
    raw = _opaque(arrays[0].dtype)
    return np.concatenate([a.view(raw) for a in arrays]).view(arrays[0].dtype)


def ring_sizes(ev: np.ndarray) -> dict[tuple[int, int], int]:
    """(pid, vm) -> ring size in entries (struct kvm_dirty_gfn, 16 bytes each) from the
    RING_SIZE events of ``ev`` (KVM_CAP_DIRTY_LOG_RING's value: bytes); later ones win."""
    sel = ev[np.ascontiguousarray(ev["kind"]) == Kind.RING_SIZE]
    return {(int(e["pid"]), int(e["vm"])): entries_from_bytes(int(e["value"])) for e in sel}


def vm_keys(ev: np.ndarray) -> np.ndarray:
    """Each event's (pid, vm) as one u64, ``pid << 32 | vm`` (vm as u32): for np.isin and
    np.unique over VMs."""
    return (ev["pid"].astype(np.uint64) << np.uint64(32)) | ev["vm"].astype(np.uint32)


def vm_pairs(ev: np.ndarray) -> list[tuple[int, int]]:
    """The distinct (pid, vm) of ``ev``, sorted, vm signed. Vectorised: events come in
    runs of one VM, so only the first key of each run is sorted."""
    if not len(ev):
        return []
    pid, vm = ev["pid"], ev["vm"]
    head = np.empty(len(ev), bool)
    head[0] = True
    np.not_equal(pid[1:], pid[:-1], out=head[1:])
    head[1:] |= vm[1:] != vm[:-1]
    return sorted((k >> 32, (k & 0xFFFFFFFF) - ((k & 0x80000000) << 1))
                  for k in np.unique(vm_keys(ev[head])).tolist())
