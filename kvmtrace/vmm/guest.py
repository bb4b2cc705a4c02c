"""The built-in guest: a 32-bit protected-mode program the VMM assembles itself.

Guest physical memory (one memory slot at GPA 0, 4 KiB pages, no paging):

- page 0: the code, shared by every vCPU;
- pages ``0x100 + i*pages`` .. ``0x100 + (i+1)*pages - 1``: vCPU ``i``'s data pages;
- after the data: one visit table per vCPU, an array of u32 guest physical page addresses.

Each vCPU walks its table: load an address, increment one byte there (the only write, so
the only thing that dirties a page), count the write in EDX, and every ``exit_every`` writes
do ``out PORT, al`` (a KVM_EXIT_IO). After the table has been walked ``passes`` times it
executes ``hlt`` (KVM_EXIT_HLT: no in-kernel irqchip, so HLT exits to userspace). Reading the
code and the tables never dirties a page.

Registers at entry: EBP = table start, EDI = table end (GPAs), EBX = passes (0 = 2**32,
i.e. run until stopped), ECX = ``exit_every``, EDX = 0 (writes done), RIP = 0.

The trace-driven guest (:mod:`.traced`, ``workload --replay``) is the same loop assembled
with ``mark_port``: a table entry with bit 0 set (page addresses are 4 KiB aligned, so the
bit is free) first does ``out MARK_PORT, al``, where the VMM harvests that vCPU's ring and
resets, then writes its page (the byte at page + 1, the same page).
"""

from __future__ import annotations

import math
import random
from array import array
from dataclasses import dataclass
from typing import Protocol

from ..errors import UsageError
from ..host.kvm import PAGE_SIZE
from .vm import MemoryRegion

__all__ = [
    "GUEST_PORT", "MARK_PORT", "DATA_FIRST_PAGE", "MAX_GUEST_BYTES", "PATTERNS", "HOT_FRACTION",
    "GuestCode", "assemble", "visit_order", "GuestLayout", "TableLayout", "load_tables",
]

GUEST_PORT = 0x10  # I/O port of the guest's `out` (KVM_EXIT_IO)
MARK_PORT = 0x11  # I/O port of a marked table entry: harvest and reset here (--replay)
DATA_FIRST_PAGE = 0x100  # guest page number of vCPU 0's first data page
MAX_GUEST_BYTES = 1 << 30  # guest memory the built-in VMM is willing to map (1 GiB)
PATTERNS = ("seq", "random", "hot")
HOT_FRACTION = 8  # "hot": the hot set is the first ceil(pages / 8) pages


@dataclass(frozen=True)
class GuestCode:
    """Machine code (loaded at GPA 0) and the offsets of its labels.

    ``labels``: outer (top of a pass), inner (top of a visit), mark (the ``out`` to
    ``mark_port`` of a marked entry, only with ``mark_port``), write (``inc byte [eax]``),
    count (``inc edx``, right after the write), exit (the ``out``, absent when
    ``exit_every`` is 0), skip, done (the ``hlt``).
    """

    code: bytes
    labels: dict[str, int]
    exit_every: int
    port: int
    mark_port: int | None = None

    def writes_done(self, edx: int, rip: int) -> int:
        """Guest writes done so far, from the guest's EDX and RIP (exact at any stop):
        a vCPU stopped between the write and ``inc edx`` has done one more write."""
        return (edx & 0xFFFFFFFF) + (1 if rip == self.labels["count"] else 0)


class _Asm:
    """A minimal x86-32 emitter with rel8 label fix-ups."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    def label(self, name: str) -> None:
        self.labels[name] = len(self.buf)

    def emit(self, *data: int) -> None:
        self.buf += bytes(data)

    def jcc8(self, opcode: int, target: str) -> None:
        self.emit(opcode, 0)
        self.fixups.append((len(self.buf) - 1, target))

    def finish(self) -> bytes:
        for pos, target in self.fixups:
            rel = self.labels[target] - (pos + 1)
            if not -128 <= rel <= 127:
                raise ValueError(f"jump to {target} out of rel8 range")
            self.buf[pos] = rel & 0xFF
        return bytes(self.buf)


def assemble(exit_every: int, port: int = GUEST_PORT,
             mark_port: int | None = None) -> GuestCode:
    """Assemble the guest loop; ``exit_every`` = writes between ``out``s (0 = never exit).
    ``mark_port``: table entries with bit 0 set do ``out mark_port, al`` before the write."""
    if not 0 <= exit_every <= 0xFFFFFFFF:
        raise UsageError(f"--exit-every {exit_every} is out of range", "use 0 .. 2**32-1")
    a = _Asm()
    a.label("outer")
    a.emit(0x89, 0xEE)  # mov esi, ebp
    a.label("inner")
    a.emit(0x8B, 0x06)  # mov eax, [esi]
    if mark_port is not None:
        a.emit(0xA8, 0x01)  # test al, 1
        a.jcc8(0x74, "write")  # jz write
        a.label("mark")
        a.emit(0xE6, mark_port & 0xFF)  # out mark_port, al
    a.label("write")
    a.emit(0xFE, 0x00)  # inc byte [eax]
    a.label("count")
    a.emit(0x42)  # inc edx
    a.emit(0x83, 0xC6, 0x04)  # add esi, 4
    if exit_every:
        a.emit(0x49)  # dec ecx
        a.jcc8(0x75, "skip")  # jnz skip
        a.emit(0xB9, *exit_every.to_bytes(4, "little"))  # mov ecx, exit_every
        a.label("exit")
        a.emit(0xE6, port & 0xFF)  # out port, al
    a.label("skip")
    a.emit(0x39, 0xFE)  # cmp esi, edi
    a.jcc8(0x72, "inner")  # jb inner
    a.emit(0x4B)  # dec ebx
    a.jcc8(0x75, "outer")  # jnz outer
    a.label("done")
    a.emit(0xF4)  # hlt
    a.jcc8(0xEB, "done")  # jmp done
    return GuestCode(a.finish(), dict(a.labels), exit_every, port & 0xFF,
                     None if mark_port is None else mark_port & 0xFF)


def visit_order(pattern: str, pages: int, vcpu: int = 0, seed: int = 0) -> list[int]:
    """One pass's page visits for ``vcpu``, as page indices 0..pages-1.

    seq: 0, 1, ..., pages-1. random: a permutation drawn from (seed, vcpu). hot: every page
    once in order, each followed by a write to a page drawn from the hot set (the first
    ceil(pages / HOT_FRACTION) pages), so a pass makes 2 * pages writes and every page is
    written at least once.
    """
    if pattern == "seq":
        return list(range(pages))
    rng = random.Random(f"kvmtrace:{seed}:{vcpu}")
    if pattern == "random":
        order = list(range(pages))
        rng.shuffle(order)
        return order
    if pattern == "hot":
        hot = max(1, math.ceil(pages / HOT_FRACTION))
        order = []
        for page in range(pages):
            order += (page, rng.randrange(hot))
        return order
    raise UsageError(f"unknown pattern {pattern!r}", f"use one of {', '.join(PATTERNS)}")


@dataclass(frozen=True)
class GuestLayout:
    """Where everything lives in guest physical memory for a given workload shape."""

    vcpus: int
    pages: int
    pattern: str = "seq"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vcpus < 1:
            raise UsageError(f"--vcpus {self.vcpus} must be at least 1")
        if self.pages < 1:
            raise UsageError(f"--pages {self.pages} must be at least 1")
        if self.pattern not in PATTERNS:
            raise UsageError(f"unknown pattern {self.pattern!r}",
                             f"use one of {', '.join(PATTERNS)}")
        if self.memory_bytes > MAX_GUEST_BYTES:
            raise UsageError(
                f"--pages {self.pages} x --vcpus {self.vcpus} needs "
                f"{self.memory_bytes / 2**20:.0f} MiB of guest memory, more than the "
                f"{MAX_GUEST_BYTES >> 20} MiB the built-in guest maps",
                "use fewer pages or vCPUs")

    @property
    def table_len(self) -> int:
        """Entries (u32 page addresses) in each vCPU's table: writes per pass."""
        return self.pages * (2 if self.pattern == "hot" else 1)

    @property
    def table_pages(self) -> int:
        return -(-self.table_len * 4 // PAGE_SIZE)

    def data_page(self, vcpu: int, index: int = 0) -> int:
        """Guest page number (= dirty-ring offset in slot 0) of vCPU's ``index``-th page."""
        return DATA_FIRST_PAGE + vcpu * self.pages + index

    def table_gpa(self, vcpu: int) -> int:
        first = DATA_FIRST_PAGE + self.vcpus * self.pages + vcpu * self.table_pages
        return first * PAGE_SIZE

    @property
    def memory_bytes(self) -> int:
        pages = DATA_FIRST_PAGE + self.vcpus * (self.pages + self.table_pages)
        return pages * PAGE_SIZE

    def regions(self) -> list[MemoryRegion]:
        """The one memory slot: slot 0 at GPA 0, dirty-logged, code and tables included."""
        return [MemoryRegion(0, 0, self.memory_bytes)]

    def visits(self, vcpu: int) -> list[int]:
        """Guest page numbers vCPU ``vcpu`` writes in one pass, in order."""
        base = self.data_page(vcpu)
        return [base + i for i in visit_order(self.pattern, self.pages, vcpu, self.seed)]

    def table(self, vcpu: int) -> array:
        """vCPU ``vcpu``'s table as it is stored in the guest: u32 GPAs, little endian."""
        return array("I", (page * PAGE_SIZE for page in self.visits(vcpu)))

    def initial_regs(self, vcpu: int, passes: int, exit_every: int,
                     code: GuestCode | None = None) -> dict[str, int]:
        """General purpose registers at entry (``passes`` 0 = until stopped); ``code`` is
        not needed here (every vCPU has pages to write)."""
        start = self.table_gpa(vcpu)
        return {"rbp": start, "rdi": start + 4 * self.table_len, "rbx": passes & 0xFFFFFFFF,
                "rcx": exit_every, "rdx": 0, "rsi": start, "rip": 0, "rflags": 0x2}

    def load(self, memory: memoryview | bytearray, code: GuestCode) -> None:
        """Write the code and every table into ``memory`` (the slot's host mapping)."""
        load_tables(memory, code, self)

    def written_entries(self, vcpu: int, writes: int) -> set[tuple[int, int]]:
        """Distinct (slot, offset) vCPU ``vcpu`` dirtied given it made ``writes`` writes."""
        return {(0, page) for page in self.written_pages(vcpu, writes)}

    def written_pages(self, vcpu: int, writes: int) -> set[int]:
        """Distinct guest pages vCPU ``vcpu`` wrote given it made ``writes`` writes."""
        visits = self.visits(vcpu)
        return set(visits if writes >= len(visits) else visits[:writes])


class TableLayout(Protocol):
    """What :func:`load_tables` needs of a guest layout: per vCPU a table of page addresses
    (u64 each) and the guest physical address it is written at, in the code slot."""

    vcpus: int

    def table(self, vcpu: int) -> array: ...

    def table_gpa(self, vcpu: int) -> int: ...


def load_tables(memory: memoryview | bytearray, code: GuestCode, layout: TableLayout) -> None:
    """Write the guest's code at address 0 of ``memory`` (the code slot's host mapping) and
    each vCPU's table at its address."""
    memory[: len(code.code)] = code.code
    for vcpu in range(layout.vcpus):
        raw = layout.table(vcpu).tobytes()
        start = layout.table_gpa(vcpu)
        memory[start:start + len(raw)] = raw
