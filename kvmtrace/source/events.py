"""The event record every source yields: a numpy structured array of :data:`EVENT_DTYPE`.

The layout is the BPF side's ``struct kt_event`` (kvmtrace/bpf/probes/kvmtrace.h) byte
for byte, so records read from a BPF ring buffer are a zero-copy view. Importers of ftrace
and perf text fill the same fields they can and leave the rest at their "unknown" values.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = [
    "EVENT_DTYPE",
    "Kind",
    "VM_UNKNOWN",
    "RING_UNKNOWN",
    "VM_GEN_SHIFT",
    "vm_fd",
    "vm_gen",
    "vm_id",
    "vm_label",
    "empty",
]


class Kind(enum.IntEnum):
    """``KT_*`` in kvmtrace/bpf/probes/kvmtrace.h."""

    PUSH = 1  #: kvm:kvm_dirty_ring_push, fired after dirty_index++
    RESET = 2  #: kvm:kvm_dirty_ring_reset, once per ring per KVM_RESET_DIRTY_RINGS
    EXIT = 3  #: kvm:kvm_dirty_ring_exit, a soft-full exit (KVM_EXIT_DIRTY_RING_FULL = 31)
    STALL = 4  #: from exit 31 reaching userspace to the vCPU's next KVM_RUN; value = ns
    RESET_LAT = 5  #: duration of one KVM_RESET_DIRTY_RINGS ioctl; value = ns
    RING_SIZE = 6  #: KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]); value = bytes, slot = cap


VM_UNKNOWN = -1
RING_UNKNOWN = -1

#: ``vm = fd | gen << VM_GEN_SHIFT``, packed like a dev_t: the kernel's fd limit
#: (fs.nr_open) is at most 2**20, so the fd fits the low 20 bits. ``gen`` is 0 for the first
#: VM the tracer saw under (pid, fd), +1 for each later VM under the same (pid, fd) (the fd
#: was closed and reused). -1 (VM_UNKNOWN) keeps meaning "unknown".
VM_GEN_SHIFT = 20
_FD_MASK = (1 << VM_GEN_SHIFT) - 1


def vm_fd(vm: int) -> int:
    """The VMM's file descriptor of a packed ``vm``. Negative ids stay themselves: -1
    unknown, -2, -3, ... the VMs a text import told apart (no fd known)."""
    return vm if vm < 0 else vm & _FD_MASK


def vm_gen(vm: int) -> int:
    """The generation of a packed ``vm``: VMs seen before it under the same (pid, fd)
    (0 for -1)."""
    return 0 if vm < 0 else vm >> VM_GEN_SHIFT


def vm_id(fd: int, gen: int = 0) -> int:
    """The packed ``vm`` of the gen-th VM seen under fd (fd < 0 gives -1)."""
    if fd < 0:
        return VM_UNKNOWN
    if fd > _FD_MASK or gen < 0 or gen >= 1 << (31 - VM_GEN_SHIFT):
        raise ValueError(f"vm fd {fd} / gen {gen} out of range")
    return fd | gen << VM_GEN_SHIFT


def vm_label(vm: int) -> str:
    """Text form of a packed ``vm``: ``5`` for gen 0, ``5#1`` for the next VM under fd 5,
    ``-1`` unknown, ``-2`` a VM a text import told apart."""
    gen = vm_gen(vm)
    return f"{vm_fd(vm)}#{gen}" if gen else str(vm_fd(vm))

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
