"""The multiboot ELF QEMU boots (kvmtrace.vmm.multiboot), read back byte by byte: ELF and
multiboot headers as QEMU's loader and the multiboot spec require, the built-in guest's
loop, and one visit table per vCPU in the built-in guest's page orders."""

from __future__ import annotations

import struct

import pytest

from kvmtrace.errors import UsageError
from kvmtrace.vmm.guest import assemble, visit_order
from kvmtrace.vmm.multiboot import DATA_ADDR, LOAD_ADDR, QEMU_PORT, MultibootGuest


def test_headers():
    img = MultibootGuest(vcpus=2, pages=100).image()
    ident, etype, machine, _, entry, phoff = struct.unpack_from("<16sHHIII", img)
    assert ident[:4] == b"\x7fELF" and ident[4] == 1 and ident[5] == 1  # ELF32, LE
    assert (etype, machine, phoff) == (2, 3, 52)  # ET_EXEC, EM_386
    ptype, off, vaddr, paddr, filesz, memsz = struct.unpack_from("<IIIIII", img, 52)
    assert (ptype, off, vaddr, paddr, filesz, memsz) == (1, 0, LOAD_ADDR, LOAD_ADDR,
                                                        len(img), len(img))
    assert LOAD_ADDR <= entry < LOAD_ADDR + len(img)
    at = img.find(struct.pack("<I", 0x1BADB002))
    assert 0 <= at < 8192 and at % 4 == 0
    magic, flags, check = struct.unpack_from("<III", img, at)
    assert flags == 0 and (magic + flags + check) & 0xFFFFFFFF == 0


@pytest.mark.parametrize("pattern", ["seq", "random", "hot"])
def test_loop_and_tables(pattern):
    g = MultibootGuest(vcpus=3, pages=50, pattern=pattern, exit_every=7, seed=4)
    img = g.image()
    lo, hi = g.loop_span()
    assert img[lo - LOAD_ADDR:hi - LOAD_ADDR] == assemble(7, QEMU_PORT).code
    n = 50 * (2 if pattern == "hot" else 1)
    assert g.table_len == n
    tables = img[-3 * 4 * n:]
    for v in range(3):
        got = struct.unpack_from(f"<{n}I", tables, 4 * n * v)
        want = [DATA_ADDR + (v * 50 + i) * 4096 for i in visit_order(pattern, 50, v, 4)]
        assert list(got) == want
    assert g.memory_mib * (1 << 20) >= DATA_ADDR + 3 * 50 * 4096


def test_bad_shapes_are_usage_errors():
    for kw in ({"vcpus": 0}, {"pages": 0}, {"pattern": "zigzag"}, {"vcpus": 256},
               {"vcpus": 255, "pages": 16384}):  # tables would reach the data pages
        with pytest.raises(UsageError):
            MultibootGuest(**kw)
