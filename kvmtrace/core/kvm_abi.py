"""Kernel ABI facts of the KVM dirty ring, defined once for the whole package.

Sources: ``include/uapi/linux/kvm.h`` (``struct kvm_dirty_gfn``, its flags),
``include/linux/kvm_host.h`` and ``include/linux/kvm_dirty_ring.h`` (the reserve, the
maximum size), ``virt/kvm/dirty_ring.c`` (soft limit, u32 indices). Units: a ring's size is
in entries of ``struct kvm_dirty_gfn`` (16 bytes: u32 flags, u32 slot, u64 offset);
``KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)`` takes bytes.

Also here: the packing of the ``vm`` field of events, ring keys and map keys
(``vm = fd | gen << VM_GEN_SHIFT``, like a dev_t), which kvmtrace.h mirrors in C.
"""

from __future__ import annotations

__all__ = [
    "GFN_BYTES",
    "KVM_DIRTY_GFN_F_DIRTY",
    "KVM_DIRTY_GFN_F_RESET",
    "KVM_DIRTY_RING_RSVD_ENTRIES",
    "PML_ENTRIES",
    "RSVD_ENTRIES_PML",
    "KVM_DIRTY_RING_MAX_ENTRIES",
    "MIN_RING_BYTES",
    "MIN_RING_ENTRIES",
    "U32_MASK",
    "UNKNOWN_SLOT",
    "u32",
    "s32",
    "entries_from_bytes",
    "bytes_from_entries",
    "soft_limit_of",
    "valid_entries",
    "infer_size",
    "RESERVES_UNKNOWN",
    "VM_UNKNOWN",
    "VM_GEN_SHIFT",
    "vm_fd",
    "vm_gen",
    "vm_id",
    "vm_label",
]

GFN_BYTES = 16  #: sizeof(struct kvm_dirty_gfn)
KVM_DIRTY_GFN_F_DIRTY = 1 << 0  #: set by the kernel on push
KVM_DIRTY_GFN_F_RESET = 1 << 1  #: set by the VMM on harvest, cleared by KVM_RESET_DIRTY_RINGS
KVM_DIRTY_RING_RSVD_ENTRIES = 64  #: include/linux/kvm_dirty_ring.h
#: kvm_cpu_dirty_log_size() on Intel hosts with PML: the PML buffer's 512 entries, added to
#: the reserve (arch/x86/kvm/vmx: PML_LOG_NR_ENTRIES); 0 elsewhere
PML_ENTRIES = 512
RSVD_ENTRIES_PML = KVM_DIRTY_RING_RSVD_ENTRIES + PML_ENTRIES  #: 576, the reserve with PML
KVM_DIRTY_RING_MAX_ENTRIES = 65536  #: include/linux/kvm_host.h
MIN_RING_BYTES = 4096  #: one page on x86: the smallest ring KVM_ENABLE_CAP accepts
MIN_RING_ENTRIES = MIN_RING_BYTES // GFN_BYTES  #: 256
U32_MASK = 0xFFFF_FFFF  #: dirty_index and reset_index are free-running u32
#: slot value of an entry whose content the trace never showed (lost or before tracing)
UNKNOWN_SLOT = U32_MASK


def u32(x: int) -> int:
    """x as the kernel's u32."""
    return x & U32_MASK


def s32(x: int) -> int:
    """The signed distance of a u32 difference (serial-number arithmetic)."""
    x &= U32_MASK
    return x - (1 << 32) if x & 0x80000000 else x


def entries_from_bytes(ring_bytes: int) -> int:
    """Ring bytes as given to KVM_ENABLE_CAP -> entries (16-byte ``struct kvm_dirty_gfn``)."""
    return ring_bytes // GFN_BYTES


def bytes_from_entries(entries: int) -> int:
    """Ring entries -> bytes as given to KVM_ENABLE_CAP."""
    return entries * GFN_BYTES


def soft_limit_of(size: int, reserved: int = KVM_DIRTY_RING_RSVD_ENTRIES) -> int:
    """``kvm_dirty_ring.soft_limit`` for a ring of ``size`` entries."""
    return size - reserved


def _pow2_floor(x: int) -> int:
    return 1 << (x.bit_length() - 1) if x > 0 else 0


def _pow2_ceil(x: int) -> int:
    return 1 << (x - 1).bit_length() if x > 1 else 1


def valid_entries(entries: int) -> bool:
    """A ring size KVM accepts: a power of two from one page (256 entries) to 65536."""
    return (MIN_RING_ENTRIES <= entries <= KVM_DIRTY_RING_MAX_ENTRIES
            and not entries & (entries - 1))


#: The reserves a host may use when which one is not known (live maps): without and with
#: Intel PML.
RESERVES_UNKNOWN: tuple[int, ...] = (KVM_DIRTY_RING_RSVD_ENTRIES, RSVD_ENTRIES_PML)


def _size_for_reserve(exit_used: int, max_used: int, reserved: int) -> int | None:
    upper = min(_pow2_floor(max(exit_used, 0) + reserved), KVM_DIRTY_RING_MAX_ENTRIES)
    lower = max(MIN_RING_ENTRIES, _pow2_ceil(max_used), _pow2_ceil(reserved))
    size = lower if lower <= upper else upper
    return size if valid_entries(size) and size >= reserved else None


def infer_size(
    exit_used: int, max_used: int | None = None,
    reserved: int | tuple[int, ...] = KVM_DIRTY_RING_RSVD_ENTRIES,
) -> int | None:
    """Ring size (entries of ``struct kvm_dirty_gfn``) implied by a soft-full exit seen at
    ``used = exit_used``, or None: the one inference rule of the package (replay, the
    reference replay and the live maps).

    Kernel facts (virt/kvm/dirty_ring.c, kvm_main.c): ``soft_limit = size - reserve``
    where the reserve is ``kvm_dirty_ring_get_rsvd_entries()`` =
    ``KVM_DIRTY_RING_RSVD_ENTRIES`` (64) + ``kvm_cpu_dirty_log_size()`` (the PML buffer,
    512, on VMX hosts with PML on; 0 otherwise). Linux 5.11-6.15 had one reserve per host
    (``kvm_dirty_ring_get_rsvd_entries(void)``); since 6.16 it is per VM
    (``kvm_dirty_ring_get_rsvd_entries(struct kvm *)``, 0 PML entries for a TDX guest).
    ``KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)`` accepts a power of two of at least one page
    and of at least the reserve, at most 65536 entries; a vCPU exits
    (``KVM_EXIT_DIRTY_RING_FULL``) only at ``used >= soft_limit``.

    For one reserve ``r``: ``size <= exit_used + r`` (upper bound) and, without overflow,
    ``size >= max_used`` (lower bound, ``max_used`` defaults to ``exit_used``); the answer
    is the smallest accepted size within both bounds, else the upper bound (the ring
    overflowed before exiting), else None (an exit too early to be a soft-full one).
    Assumes the ring did not overflow by more than ``r`` entries before its first exit.

    ``reserved`` may name several reserves when which one the host uses is unknown
    (:data:`RESERVES_UNKNOWN`): their bounds overlap (an exit at 448 fits 512 - 64 and
    1024 - 576), so an answer then counts only when the exit was exactly at its soft
    limit (``exit_used + r == size``), and only a unique answer is returned.
    """
    mx = exit_used if max_used is None else max_used
    if isinstance(reserved, int):
        return _size_for_reserve(exit_used, mx, reserved)
    if exit_used <= 0:
        return None
    found = {s for r in reserved
             if (s := _size_for_reserve(exit_used, mx, r)) is not None and s == exit_used + r}
    return found.pop() if len(found) == 1 else None


VM_UNKNOWN = -1

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
