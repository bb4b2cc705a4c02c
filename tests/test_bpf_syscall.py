"""The bpf(2) shim's ``union bpf_attr`` members, constants and ``struct bpf_map_info`` head
match the running kernel's own BTF (/sys/kernel/btf/vmlinux): every named field at the
kernel's offset, every enum value the kernel's."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest
from conftest import require

from kvmtrace.host import bpf_syscall as b
from kvmtrace.host.btf import VMLINUX, load_vmlinux


@pytest.fixture(autouse=True)
def _btf() -> None:
    require(VMLINUX.exists(), f"no kernel BTF ({VMLINUX}: CONFIG_DEBUG_INFO_BTF)")

_STRUCT, _UNION, _ENUM = 4, 5, 6

# shim structure -> a field only that member of union bpf_attr has
ATTRS = {
    b.MapCreateAttr: "map_type",
    b.MapElemAttr: "next_key",
    b.ProgLoadAttr: "insn_cnt",
    b.ProgTestRunAttr: "test",
    b.ObjInfoAttr: "info",
    b.RawTracepointOpenAttr: "raw_tracepoint",
    b.MapBatchAttr: "batch",
}


def _union_members(btf) -> dict[str, dict[str, int]]:
    """union bpf_attr's members: named ones by name, anonymous structs by each field."""
    tid = btf.find(_UNION, "bpf_attr")
    _kind, _name, _size, items, info = btf._types[tid]
    out: dict[str, dict[str, int]] = {}
    for i in range(info & 0xFFFF):
        name_off, mtype, _off = struct.unpack_from("<3I", btf._data, items + 12 * i)
        fields = {n: m.offset for n, m in btf._members(btf._strip(mtype), 0).items()}
        if name_off:
            out[btf._str(name_off)] = fields
        else:
            for n in fields:
                out.setdefault(n, fields)
    return out


def _enum(btf, name: str) -> dict[str, int]:
    tid = btf.find(_ENUM, name)
    _kind, _name, _size, items, info = btf._types[tid]
    return {btf._str(n): v for n, v in (struct.unpack_from("<Ii", btf._data, items + 8 * i)
                                        for i in range(info & 0xFFFF))}


def _layout(cls: type[ctypes.Structure]) -> dict[str, int]:
    return {f[0]: getattr(cls, f[0]).offset for f in cls._fields_ if not f[0].startswith("_")}


@pytest.mark.parametrize("cls", list(ATTRS), ids=lambda c: c.__name__)
def test_attr_layout_is_the_kernels(cls: type[ctypes.Structure]) -> None:
    kernel = _union_members(load_vmlinux())[ATTRS[cls]]
    mine = _layout(cls)
    assert {n: kernel.get(n) for n in mine} == mine


@pytest.mark.parametrize(("cls", "struct_name"), [(b.MapInfo, "bpf_map_info"),
                                                   (b.ProgInfo, "bpf_prog_info")])
def test_info_layout_is_the_kernels(cls: type[ctypes.Structure], struct_name: str) -> None:
    kernel = {n: m.offset for n, m in load_vmlinux().members(struct_name).items()}
    mine = _layout(cls)
    assert {n: kernel.get(n) for n in mine} == mine


def test_constants_are_the_kernels() -> None:
    btf = load_vmlinux()
    cmds, progs = _enum(btf, "bpf_cmd"), _enum(btf, "bpf_prog_type")
    attach, maps = _enum(btf, "bpf_attach_type"), _enum(btf, "bpf_map_type")
    assert {c.name: c.value for c in b.BpfCmd} == {c.name: cmds[f"BPF_{c.name}"]
                                                  for c in b.BpfCmd}
    assert {p.name: p.value for p in b.ProgType} == {
        p.name: progs[f"BPF_PROG_TYPE_{p.name}"] for p in b.ProgType}
    assert b.AttachType.TRACE_FENTRY == attach["BPF_TRACE_FENTRY"]
    assert b.MAP_TYPE_RINGBUF == maps["BPF_MAP_TYPE_RINGBUF"]


def test_a_file_that_is_no_map_is_an_oserror_naming_the_command() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="BPF_OBJ_GET_INFO_BY_FD") as err:
            b.map_info(fd)
    finally:
        os.close(fd)
    assert err.value.errno == errno.EINVAL  # the fd is open but no BPF object
