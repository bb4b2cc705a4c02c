"""A multiboot ELF of the built-in guest loop, for QEMU (``-kernel guest.elf``).

QEMU's multiboot loader starts the bootstrap vCPU in 32-bit protected mode, paging off,
flat segments, interrupts off, at the ELF entry (header: magic 0x1BADB002, flags 0). The
image (one PT_LOAD segment at :data:`LOAD_ADDR`) holds:

- the bootstrap code: with more than one vCPU it copies a real-mode trampoline to
  :data:`TRAMPOLINE_ADDR`, software-enables its local APIC and sends INIT then twice a
  startup IPI (vector ``TRAMPOLINE_ADDR >> 12``) to all other vCPUs; the trampoline loads
  its own GDT, enters protected mode and joins the common code;
- the common code: every vCPU reads its local APIC ID (``[0xFEE00020] >> 24``, 0..N-1 under
  QEMU's default topology), points EBP/EDI at its own visit table and runs the loop of
  :func:`kvmtrace.vmm.guest.assemble` (one ``inc byte`` per visited page, ``out PORT`` every
  ``exit_every`` writes, ``hlt`` after ``passes`` passes, 0 = run until stopped);
- the visit tables, u32 guest physical addresses of 4 KiB data pages in the order of
  :func:`kvmtrace.vmm.guest.visit_order` (patterns ``seq``, ``random``, ``hot``).

vCPU ``i``'s data pages are ``DATA_ADDR + (i * pages + k) * 4096``, k = 0..pages-1. Only the
loop's ``inc byte`` writes guest memory after boot (the trampoline copy dirties one page
before any vCPU runs the loop), so with dirty logging on every dirty-ring entry of a
vCPU is one of its data pages.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..host.kvm import PAGE_SIZE
from .guest import PATTERNS, assemble, visit_order

__all__ = ["LOAD_ADDR", "TRAMPOLINE_ADDR", "DATA_ADDR", "QEMU_PORT", "MultibootGuest"]

LOAD_ADDR = 0x100000  #: where the ELF's one segment is loaded (1 MiB)
TRAMPOLINE_ADDR = 0x8000  #: real-mode start of the other vCPUs (startup IPI vector 0x08)
DATA_ADDR = 0x1000000  #: first data page (16 MiB): above the image and QEMU's boot info
QEMU_PORT = 0x80  #: the guest's ``out`` port: QEMU's POST port, a write it ignores
MULTIBOOT_MAGIC = 0x1BADB002
_APIC = 0xFEE00000
_HDR = 0x60  #: offset of the multiboot header (after the ELF and program headers)
_CODE = 0x80  #: offset of the bootstrap code
_SEL_CODE, _SEL_DATA = 0x08, 0x10
_GDT = struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)  # null, code, data
_DELAY = 1 << 20  #: loop iterations between the IPIs
# code lengths (bytes), checked when the image is built: the bootstrap's extra code with
# more than one vCPU (copy + APIC enable + INIT + 2 startup IPIs), the common entry, the
# other vCPUs' 32-bit entry
_BOOT_SMP_LEN, _COMMON_LEN, _AP32_LEN = 74, 41, 15


def _u32(x: int) -> bytes:
    return struct.pack("<I", x & 0xFFFFFFFF)


def _delay() -> bytes:
    return b"\xb9" + _u32(_DELAY) + b"\x49\x75\xfd"  # mov ecx, N; dec ecx; jnz .-1


def _trampoline(ap32: int) -> bytes:
    """16-bit code run at TRAMPOLINE_ADDR (CS = TRAMPOLINE_ADDR >> 4, IP = 0), then its
    GDTR and GDT; it far-jumps to ``ap32`` in 32-bit protected mode."""
    gdtr_off = 24  # the code below is 24 bytes
    code = (b"\xfa"  # cli
            + b"\x66\x2e\x0f\x01\x16" + struct.pack("<H", gdtr_off)  # lgdt cs:[gdtr] (32-bit)
            + b"\x0f\x20\xc0"  # mov eax, cr0
            + b"\x0c\x01"  # or al, 1 (PE)
            + b"\x0f\x22\xc0"  # mov cr0, eax
            + b"\x66\xea" + _u32(ap32) + struct.pack("<H", _SEL_CODE))  # jmp far 08:ap32
    assert len(code) == gdtr_off
    gdtr = struct.pack("<HI", len(_GDT) - 1, TRAMPOLINE_ADDR + gdtr_off + 8).ljust(8, b"\0")
    return code + gdtr + _GDT


@dataclass(frozen=True)
class MultibootGuest:
    """The guest for ``vcpus`` vCPUs, each visiting ``pages`` data pages per pass in
    ``pattern`` order, ``passes`` passes (0 = until stopped), an ``out`` every
    ``exit_every`` writes (0 = never; then the ring can overflow between exits)."""

    vcpus: int = 1
    pages: int = 16384
    pattern: str = "seq"
    passes: int = 0
    exit_every: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.vcpus <= 255:
            raise UsageError(f"vcpus {self.vcpus}: must be 1..255")
        if self.pages < 1:
            raise UsageError(f"pages {self.pages}: must be at least 1")
        if self.pattern not in PATTERNS:
            raise UsageError(f"unknown pattern {self.pattern!r}",
                             f"use one of {', '.join(PATTERNS)}")
        if not 0 <= self.passes <= 0xFFFFFFFF:
            raise UsageError(f"passes {self.passes}: must be 0..2**32-1")
        if LOAD_ADDR + 2 * PAGE_SIZE + 4 * self.table_len * self.vcpus > DATA_ADDR:
            raise UsageError(f"{self.vcpus} vCPUs x {self.pages} pages: the visit tables do "
                             "not fit below the data pages", "use fewer pages or vCPUs")

    @property
    def table_len(self) -> int:
        """Writes per pass of one vCPU (entries of its visit table)."""
        return self.pages * (2 if self.pattern == "hot" else 1)

    def data_page(self, vcpu: int, index: int) -> int:
        """Guest page number (GPA >> 12) of vCPU ``vcpu``'s ``index``-th data page."""
        return DATA_ADDR // PAGE_SIZE + vcpu * self.pages + index

    def visits(self, vcpu: int) -> list[int]:
        """Guest page numbers vCPU ``vcpu`` writes in one pass, in order."""
        return [self.data_page(vcpu, i)
                for i in visit_order(self.pattern, self.pages, vcpu, self.seed)]

    @property
    def memory_mib(self) -> int:
        """Guest RAM (``-m``) that holds every data page, in MiB."""
        end = DATA_ADDR + self.vcpus * self.pages * PAGE_SIZE
        return max(32, -(-end // (1 << 20)) + 1)

    def loop_span(self) -> tuple[int, int]:
        """[start, end) guest addresses of the dirtying loop: a vCPU whose EIP is in it
        has booted and runs the workload."""
        common = LOAD_ADDR + _CODE + 1 + (_BOOT_SMP_LEN if self.vcpus > 1 else 0)
        start = common + _COMMON_LEN
        return start, start + len(assemble(self.exit_every, QEMU_PORT).code)

    def image(self) -> bytes:
        """The ELF32 file."""
        loop = assemble(self.exit_every, QEMU_PORT).code
        table_bytes = 4 * self.table_len
        # layout: headers | boot | common + loop | ap32 | trampoline | pad | tables
        boot_len = 1 + (_BOOT_SMP_LEN if self.vcpus > 1 else 0)
        common = LOAD_ADDR + _CODE + boot_len
        ap32 = common + _COMMON_LEN + len(loop)
        assert (common + _COMMON_LEN, ap32) == self.loop_span()
        tramp_at = ap32 + _AP32_LEN
        tramp = _trampoline(ap32)
        tables_at = -(-(tramp_at + len(tramp)) // PAGE_SIZE) * PAGE_SIZE
        boot = b"\xfa"  # cli
        if self.vcpus > 1:
            def icr(value: int) -> bytes:  # mov dword [APIC + 0x300], value
                return b"\xc7\x05" + _u32(_APIC + 0x300) + _u32(value)
            sipi = 0x000C4600 | TRAMPOLINE_ADDR >> 12  # startup IPI, all but self
            boot += (b"\xbe" + _u32(tramp_at)  # mov esi, the trampoline in the image
                     + b"\xbf" + _u32(TRAMPOLINE_ADDR)  # mov edi, TRAMPOLINE_ADDR
                     + b"\xb9" + _u32(len(tramp))  # mov ecx, its length
                     + b"\xfc\xf3\xa4"  # cld; rep movsb
                     + b"\xc7\x05" + _u32(_APIC + 0xF0) + _u32(0x1FF)  # SVR: APIC on
                     + icr(0x000C4500) + _delay()  # INIT, all but self
                     + icr(sipi) + _delay() + icr(sipi))
        common_code = (b"\xa1" + _u32(_APIC + 0x20)  # mov eax, [APIC ID]
                       + b"\xc1\xe8\x18"  # shr eax, 24
                       + b"\x69\xc0" + _u32(table_bytes)  # imul eax, eax, table_bytes
                       + b"\xbd" + _u32(tables_at)  # mov ebp, tables
                       + b"\x01\xc5"  # add ebp, eax
                       + b"\x89\xef"  # mov edi, ebp
                       + b"\x81\xc7" + _u32(table_bytes)  # add edi, table_bytes
                       + b"\xbb" + _u32(self.passes)  # mov ebx, passes
                       + b"\xb9" + _u32(self.exit_every)  # mov ecx, exit_every
                       + b"\x31\xd2")  # xor edx, edx; the loop follows
        ap32_code = (b"\x66\xb8" + struct.pack("<H", _SEL_DATA)  # mov ax, 0x10
                     + b"\x8e\xd8\x8e\xc0\x8e\xd0"  # mov ds/es/ss, ax
                     + b"\xe9" + _u32(common - (ap32 + _AP32_LEN)))  # jmp common
        assert (len(boot), len(common_code), len(ap32_code)) == (
            boot_len, _COMMON_LEN, _AP32_LEN), \
            (len(boot), len(common_code), len(ap32_code))
        text = boot + common_code + loop + ap32_code + tramp
        tables = b"".join(
            struct.pack(f"<{self.table_len}I", *(p * PAGE_SIZE for p in self.visits(v)))
            for v in range(self.vcpus))
        body = (_header() + text).ljust(tables_at - LOAD_ADDR, b"\0") + tables
        return _elf(body, LOAD_ADDR + _CODE)

    def write(self, path: str | Path) -> Path:
        """Write :meth:`image` to ``path`` and return it."""
        path = Path(path)
        path.write_bytes(self.image())
        return path


def _header() -> bytes:
    """ELF and program headers are filled in by :func:`_elf`; the multiboot header sits at
    offset ``_HDR`` (it must lie in the first 8 KiB, 4-byte aligned)."""
    flags = 0
    mb = struct.pack("<III", MULTIBOOT_MAGIC, flags, -(MULTIBOOT_MAGIC + flags) & 0xFFFFFFFF)
    return (b"\0" * _HDR + mb).ljust(_CODE, b"\0")


def _elf(body: bytes, entry: int) -> bytes:
    """``body`` (whose first 0x54 bytes are free for headers) as an ELF32 executable: one
    PT_LOAD of the whole file at LOAD_ADDR, entry ``entry``."""
    ehdr = struct.pack("<4sBBBBB7xHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 0,
                       2, 3, 1, entry, 52, 0, 0, 52, 32, 1, 0, 0, 0)  # ET_EXEC, EM_386
    phdr = struct.pack("<IIIIIIII", 1, 0, LOAD_ADDR, LOAD_ADDR, len(body), len(body), 7,
                       PAGE_SIZE)  # PT_LOAD, RWX
    return ehdr + phdr + body[len(ehdr) + len(phdr):]
