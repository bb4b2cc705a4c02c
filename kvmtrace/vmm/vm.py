"""VM, vCPU and dirty-ring objects of the built-in VMM (ctypes ioctl + mmap on /dev/kvm).

Setup order (the kernel requires the ring before any vCPU exists): KVM_CREATE_VM,
KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL], args[0] = ring bytes), one memory slot
with KVM_MEM_LOG_DIRTY_PAGES, then KVM_CREATE_VCPU and the mmaps of ``struct kvm_run``
(offset 0) and of the ring (offset KVM_DIRTY_LOG_PAGE_OFFSET pages) on each vCPU fd.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..core.kvm_abi import (
    GFN_BYTES,
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_GFN_F_RESET,
    MIN_RING_BYTES,
    entries_from_bytes,
)
from ..errors import KvmtraceError, MissingFeature, UsageError
from ..host import kvm as k
from ..host.kvm import open_kvm, probe_ring_caps

__all__ = ["MappedRing", "check_ring_bytes", "Vm", "Vcpu", "MemoryRegion",
           "describe_oserror", "KVM_CAP_NR_MEMSLOTS"]

KVM_CAP_NR_MEMSLOTS = 10  #: KVM_CHECK_EXTENSION: user memory slots per address space


@dataclass(frozen=True)
class MemoryRegion:
    """One memory slot (``struct kvm_userspace_memory_region``): KVM slot id (address
    space 0), guest physical address and size in bytes (page multiples), and whether it is
    dirty-logged (KVM_MEM_LOG_DIRTY_PAGES: guest writes to it push dirty-ring entries)."""

    slot: int
    gpa: int
    size: int
    log_dirty: bool = True


class MappedRing:
    """The VMM's mmap'd view of one vCPU's ``struct kvm_dirty_gfn`` array and its fetch index.

    ``buf`` is any writable buffer of ``entries`` * 16 bytes (the vCPU fd's mmap, or a
    bytearray in tests). ``fetch`` counts entries harvested so far (it wraps only through
    the mask, like the kernel's u32 indices).
    """

    def __init__(self, buf: mmap.mmap | bytearray | memoryview, entries: int) -> None:
        if entries <= 0 or entries & (entries - 1):
            raise ValueError(f"ring entries {entries} is not a power of two")
        view = memoryview(buf)
        if view.nbytes < entries * GFN_BYTES:
            raise ValueError("ring buffer smaller than entries * 16 bytes")
        self.entries = entries
        self.mask = entries - 1
        self.fetch = 0
        self._u32 = view.cast("B").cast("I")
        self._u64 = view.cast("B").cast("Q")

    def peek(self, index: int) -> tuple[int, int, int]:
        """(flags, slot, offset) of the entry at ring index ``index`` (masked)."""
        i = index & self.mask
        return self._u32[4 * i], self._u32[4 * i + 1], self._u64[2 * i + 1]

    def harvest(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Collect DIRTY entries from the fetch index on, marking each RESET.

        Stops at the first entry without KVM_DIRTY_GFN_F_DIRTY, or after ``limit`` entries
        (default: one ring's worth, so a ring the kernel keeps filling cannot hold us).
        Returns the (slot, offset) pairs in ring order. x86 is TSO, so plain loads/stores
        give the acquire/release ordering KVM_CAP_DIRTY_LOG_RING_ACQ_REL asks for.
        """
        u32, u64, mask = self._u32, self._u64, self.mask
        out: list[tuple[int, int]] = []
        budget = self.entries if limit is None else limit
        fetch = self.fetch
        while len(out) < budget:
            i = fetch & mask
            if not u32[4 * i] & KVM_DIRTY_GFN_F_DIRTY:
                break
            out.append((u32[4 * i + 1], u64[2 * i + 1]))
            u32[4 * i] = KVM_DIRTY_GFN_F_RESET
            fetch += 1
        self.fetch = fetch
        return out

    def flags_range(self, start: int, count: int) -> list[int]:
        """``flags`` of the ``count`` entries from ring index ``start`` on (masked, so the
        range may wrap; ``count`` <= entries): 0 free, 1 DIRTY (pushed), 2 RESET (harvested)."""
        if not 0 <= count <= self.entries:
            raise ValueError(f"flags_range count {count} outside 0..{self.entries}")
        first = start & self.mask
        flags = self._u32[0::4]
        head = min(count, self.entries - first)
        out = flags[first:first + head].tolist()
        if count > head:
            out += flags[:count - head].tolist()
        flags.release()
        return out

    def release(self) -> None:
        """Drop the buffer views (needed before an mmap can be closed)."""
        self._u32.release()
        self._u64.release()


def check_ring_bytes(ring_bytes: int, max_bytes: int | None = None) -> None:
    """Raise UsageError unless ``ring_bytes`` is a power of two in [4096, max_bytes]."""
    if ring_bytes < MIN_RING_BYTES or ring_bytes & (ring_bytes - 1):
        raise UsageError(f"ring size {ring_bytes} bytes is not a power of two >= 4096",
                         "use e.g. --ring-bytes 4096 (256 entries) or --ring-entries 512")
    if max_bytes is not None and ring_bytes > max_bytes:
        raise UsageError(f"ring size {ring_bytes} bytes exceeds this kernel's maximum "
                         f"{max_bytes}", f"use --ring-bytes {max_bytes} or less")


class Vcpu:
    """One vCPU: its fd, the mmap'ed ``struct kvm_run`` and its dirty ring."""

    def __init__(self, vm: Vm, index: int) -> None:
        self.index = index
        self.fd = k.ioctl(vm.fd, k.KVM_CREATE_VCPU, index)
        self._run = mmap.mmap(self.fd, vm.run_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._ring_map = mmap.mmap(self.fd, vm.ring_bytes, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE,
                                   offset=k.KVM_DIRTY_LOG_PAGE_OFFSET * k.PAGE_SIZE)
        self.ring = MappedRing(self._ring_map, entries_from_bytes(vm.ring_bytes))

    def run(self) -> int:
        """KVM_RUN once (GIL released); returns ``kvm_run.exit_reason``.
        Raises OSError(EINTR) when a signal or ``immediate_exit`` stopped it."""
        k.ioctl(self.fd, k.KVM_RUN)
        return int.from_bytes(self._run[k.KVM_RUN_EXIT_REASON:k.KVM_RUN_EXIT_REASON + 4],
                              "little")

    def set_immediate_exit(self, value: bool) -> None:
        self._run[k.KVM_RUN_IMMEDIATE_EXIT] = 1 if value else 0

    def io_exit(self) -> k.KvmIo:
        """The ``io`` member of the exit union (valid after KVM_EXIT_IO)."""
        size = ctypes.sizeof(k.KvmIo)
        return k.KvmIo.from_buffer_copy(self._run[k.KVM_RUN_IO:k.KVM_RUN_IO + size])

    def get_regs(self) -> k.KvmRegs:
        regs = k.KvmRegs()
        k.ioctl_ptr(self.fd, k.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, values: dict[str, int]) -> None:
        regs = k.KvmRegs()
        for name, value in values.items():
            setattr(regs, name, value)
        k.ioctl_ptr(self.fd, k.KVM_SET_REGS, regs)

    def enter_protected_mode(self) -> None:
        """CR0.PE = 1, flat 4 GiB code (selector 8) and data (selector 16) segments."""
        sregs = k.KvmSregs()
        k.ioctl_ptr(self.fd, k.KVM_GET_SREGS, sregs)
        flat = {"base": 0, "limit": 0xFFFFFFFF, "present": 1, "dpl": 0, "db": 1, "s": 1,
                "l": 0, "g": 1, "avl": 0, "unusable": 0}
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            seg = getattr(sregs, name)
            for field, value in flat.items():
                setattr(seg, field, value)
            seg.type = 11 if name == "cs" else 3  # code exec/read/accessed, data rw/accessed
            seg.selector = 8 if name == "cs" else 16
        sregs.cr0 |= 1
        k.ioctl_ptr(self.fd, k.KVM_SET_SREGS, sregs)

    def close(self) -> None:
        self.ring.release()
        self._ring_map.close()
        self._run.close()
        os.close(self.fd)


class Vm:
    """A VM with the dirty ring enabled and one dirty-logged memory slot at GPA 0, or the
    memory slots ``regions`` (the first at GPA 0).

    ``fd`` is the VM's file descriptor number in this process (BPF identifies VMs by it).
    ``kvm_fd``: an open /dev/kvm to create the VM with (kept open by the caller); by
    default the VM opens /dev/kvm itself and closes it with the VM. ``memory`` is the host
    mapping of the first slot, ``memories`` of every slot (``regions`` order); mappings are
    MAP_NORESERVE, so pages the guest never touches cost nothing.
    """

    def __init__(self, ring_bytes: int, memory_bytes: int, kvm_fd: int | None = None,
                 regions: Sequence[MemoryRegion] | None = None) -> None:
        self._own_kvm_fd = kvm_fd is None
        self.kvm_fd = open_kvm() if kvm_fd is None else kvm_fd
        self.fd = -1
        self.vcpus: list[Vcpu] = []
        self.memory: mmap.mmap | None = None
        self.memories: list[mmap.mmap] = []
        self._anchors: list[ctypes.c_char] = []
        self.regions = list(regions) if regions else [MemoryRegion(0, 0, memory_bytes)]
        try:
            self._setup(ring_bytes)
        except BaseException:
            self.close()
            raise

    def _setup(self, ring_bytes: int) -> None:
        api = k.ioctl(self.kvm_fd, k.KVM_GET_API_VERSION)
        if api != 12:
            raise MissingFeature(f"unexpected KVM API version {api} (want 12)")
        self.fd = k.ioctl(self.kvm_fd, k.KVM_CREATE_VM, 0)
        caps = probe_ring_caps(self.fd)
        if not caps.cap:
            raise MissingFeature("this kernel's KVM has no dirty ring "
                                 "(KVM_CAP_DIRTY_LOG_RING)", "use Linux 5.11 or newer")
        check_ring_bytes(ring_bytes, caps.max_bytes)
        self.cap, self.max_ring_bytes, self.ring_bytes = caps.cap, caps.max_bytes, ring_bytes
        enable = k.KvmEnableCap(cap=caps.cap)
        enable.args[0] = ring_bytes
        k.ioctl_ptr(self.fd, k.KVM_ENABLE_CAP, enable)
        self.run_size = k.ioctl(self.kvm_fd, k.KVM_GET_VCPU_MMAP_SIZE)
        top = max(r.slot for r in self.regions)
        if top:
            slots = k.ioctl(self.fd, k.KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS)
            if top >= slots:
                raise UsageError(f"memory slot {top} is beyond this kernel's {slots} slots",
                                 "replay a trace whose slot ids are smaller")
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        for region in self.regions:
            memory = mmap.mmap(-1, region.size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
            self.memories.append(memory)
            anchor = ctypes.c_char.from_buffer(memory)
            self._anchors.append(anchor)
            k.ioctl_ptr(self.fd, k.KVM_SET_USER_MEMORY_REGION, k.KvmUserspaceMemoryRegion(
                slot=region.slot, flags=k.KVM_MEM_LOG_DIRTY_PAGES if region.log_dirty else 0,
                guest_phys_addr=region.gpa, memory_size=region.size,
                userspace_addr=ctypes.addressof(anchor)))
        self.memory = self.memories[0]

    def add_vcpus(self, count: int) -> list[Vcpu]:
        for _ in range(count):
            self.vcpus.append(Vcpu(self, len(self.vcpus)))
        return self.vcpus

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: recycle every ring's RESET-flagged entries, vCPU by vCPU
        in index order. Returns the number of entries the kernel reset.

        Since Linux 6.16 (commit "KVM: Bail from the dirty ring reset flow if a signal is
        pending") a pending signal stops the walk before the next entry; the ioctl still
        returns the entries reset so far (not -EINTR), the interrupted ring emits no
        ``kvm_dirty_ring_reset`` tracepoint and the rings after it are not visited. Raises
        OSError on failure (a kernel that does return EINTR raises OSError(EINTR)).
        """
        return k.ioctl(self.fd, k.KVM_RESET_DIRTY_RINGS)

    @property
    def vcpu_fds(self) -> list[int]:
        return [vcpu.fd for vcpu in self.vcpus]

    def __iter__(self) -> Iterator[Vcpu]:
        return iter(self.vcpus)

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._anchors = []
        for memory in self.memories:
            memory.close()
        self.memories = []
        self.memory = None
        if self.kvm_fd >= 0 and self._own_kvm_fd:
            os.close(self.kvm_fd)
        self.kvm_fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def describe_oserror(what: str, err: OSError) -> KvmtraceError:
    """Turn a failed KVM ioctl into a one-line user error."""
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    return KvmtraceError(f"{what} failed: {name} ({err.strerror})")
