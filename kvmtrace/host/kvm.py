"""The KVM ioctl interface the built-in VMM needs: numbers, structs and a GIL-free ioctl.

Everything here mirrors ``include/uapi/linux/kvm.h`` for x86-64. ``ioctl`` goes through
ctypes' libc (a CDLL call releases the GIL), so vCPU threads calling ``KVM_RUN`` run in
parallel and a signal delivered to a vCPU thread interrupts ``KVM_RUN`` with EINTR.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

from ..errors import MissingFeature

__all__ = [
    "KVMIO", "PAGE_SIZE", "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION",
    "KVM_GET_VCPU_MMAP_SIZE", "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION", "KVM_RUN",
    "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_ENABLE_CAP",
    "KVM_RESET_DIRTY_RINGS", "KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
    "KVM_MEM_LOG_DIRTY_PAGES", "KVM_DIRTY_LOG_PAGE_OFFSET",
    "KVM_EXIT_IO", "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_SHUTDOWN", "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_INTR", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_DIRTY_RING_FULL", "EXIT_NAMES",
    "KVM_RUN_IMMEDIATE_EXIT", "KVM_RUN_EXIT_REASON", "KVM_RUN_IO",
    "KvmSegment", "KvmDtable", "KvmSregs", "KvmRegs", "KvmUserspaceMemoryRegion",
    "KvmEnableCap", "KvmIo", "ioctl", "ioctl_ptr",
    "KVM_DEV", "RingCaps", "probe_ring_caps", "open_kvm",
]

KVM_DEV = "/dev/kvm"

PAGE_SIZE = 4096
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    """Linux ``_IOC``: dir (1 = write, 2 = read) << 30 | size << 16 | type << 8 | nr."""
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment`` (24 bytes)."""

    _fields_ = [
        ("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8), ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8), ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable`` (16 bytes): a GDT/IDT base and limit."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs`` (x86, 312 bytes): segments, descriptor tables, control regs."""

    _fields_ = [
        ("cs", KvmSegment), ("ds", KvmSegment), ("es", KvmSegment), ("fs", KvmSegment),
        ("gs", KvmSegment), ("ss", KvmSegment), ("tr", KvmSegment), ("ldt", KvmSegment),
        ("gdt", KvmDtable), ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64), ("cr2", ctypes.c_uint64), ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64), ("cr8", ctypes.c_uint64), ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64), ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (x86, 144 bytes): general purpose registers, rip, rflags."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region`` (32 bytes): one guest memory slot."""

    _fields_ = [
        ("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmEnableCap(ctypes.Structure):
    """``struct kvm_enable_cap`` (104 bytes); for the dirty ring args[0] is the ring bytes."""

    _fields_ = [("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("args", ctypes.c_uint64 * 4), ("pad", ctypes.c_uint8 * 64)]


class KvmIo(ctypes.Structure):
    """The ``io`` member of ``struct kvm_run``'s exit union (KVM_EXIT_IO)."""

    _fields_ = [("direction", ctypes.c_uint8), ("size", ctypes.c_uint8),
                ("port", ctypes.c_uint16), ("count", ctypes.c_uint32),
                ("data_offset", ctypes.c_uint64)]


assert ctypes.sizeof(KvmSregs) == 312 and ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmEnableCap) == 104 and ctypes.sizeof(KvmUserspaceMemoryRegion) == 32

# /dev/kvm and VM ioctls.
KVM_GET_API_VERSION = _ioc(0, 0x00, 0)
KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_CHECK_EXTENSION = _ioc(0, 0x03, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(0, 0x04, 0)
KVM_CREATE_VCPU = _ioc(0, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(1, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_ENABLE_CAP = _ioc(1, 0xA3, ctypes.sizeof(KvmEnableCap))  # 0x4068AEA3
KVM_RESET_DIRTY_RINGS = _ioc(0, 0xC7, 0)  # 0xAEC7, returns entries reset over all rings
# vCPU ioctls.
KVM_RUN = _ioc(0, 0x80, 0)  # 0xAE80
KVM_GET_REGS = _ioc(2, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _ioc(1, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ioc(2, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _ioc(1, 0x84, ctypes.sizeof(KvmSregs))

KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_MEM_LOG_DIRTY_PAGES = 1
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # pages into the vCPU fd where the ring is mmap'ed (x86)
# struct kvm_dirty_gfn, its flags and the reserve: kvmtrace.core.kvm_abi

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_DIRTY_RING_FULL = 31
EXIT_NAMES = {
    KVM_EXIT_IO: "io", KVM_EXIT_HLT: "hlt", KVM_EXIT_MMIO: "mmio",
    KVM_EXIT_SHUTDOWN: "shutdown", KVM_EXIT_FAIL_ENTRY: "fail_entry", KVM_EXIT_INTR: "intr",
    KVM_EXIT_INTERNAL_ERROR: "internal_error", KVM_EXIT_DIRTY_RING_FULL: "dirty_ring_full",
}

# Byte offsets inside the mmap'ed struct kvm_run.
KVM_RUN_IMMEDIATE_EXIT = 1  # __u8 immediate_exit
KVM_RUN_EXIT_REASON = 8  # __u32 exit_reason
KVM_RUN_IO = 32  # start of the exit union

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def ioctl(fd: int, request: int, arg: int = 0) -> int:
    """``ioctl(fd, request, arg)`` with an integer argument; the GIL is released meanwhile.

    Returns the non-negative result; raises OSError (with errno, e.g. EINTR) on failure.
    """
    ret = _ioctl(fd, request, ctypes.c_void_p(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def ioctl_ptr(fd: int, request: int, struct: ctypes.Structure) -> int:
    """``ioctl(fd, request, &struct)``; raises OSError on failure."""
    return ioctl(fd, request, ctypes.addressof(struct))


@dataclass(frozen=True)
class RingCaps:
    """What KVM_CHECK_EXTENSION says about the dirty ring: the cap to enable (223 when
    offered, else 192) and the largest ring in bytes (0 = no dirty ring)."""

    cap: int
    max_bytes: int


def probe_ring_caps(fd: int) -> RingCaps:
    """Ask ``fd`` (/dev/kvm or a VM fd) for the dirty-ring capabilities."""
    for cap in (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING):
        size = ioctl(fd, KVM_CHECK_EXTENSION, cap)
        if size > 0:
            return RingCaps(cap, size)
    return RingCaps(0, 0)


def open_kvm() -> int:
    """Open /dev/kvm read-write; MissingFeature (one line + fix) when that is impossible."""
    try:
        return os.open(KVM_DEV, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MissingFeature(f"{KVM_DEV} does not exist",
                             "load kvm (modprobe kvm_intel or kvm_amd)") from None
    except PermissionError:
        raise MissingFeature(f"no read/write access to {KVM_DEV}",
                             "run as root or add yourself to the kvm group") from None
    except OSError as err:
        raise MissingFeature(f"cannot open {KVM_DEV}: {err.strerror}") from None
