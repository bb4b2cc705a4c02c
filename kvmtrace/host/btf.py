"""A tiny reader of kernel BTF (/sys/kernel/btf/vmlinux): struct member offsets and the
argument types of raw tracepoints.

Only what the probes need: byte offsets of named members of named structs (``struct
kvm_dirty_ring``, ``struct kvm_vcpu``), and the prototype of a tracepoint as raw
tracepoint programs see it (``btf_trace_<name>`` is a typedef of a pointer to a function
prototype whose first parameter is the tracepoint's ``void *__data`` and whose remaining
parameters are the TP_PROTO arguments).

Format: include/uapi/linux/btf.h. A header (magic 0xeB9F), then a type section of
variable-length ``struct btf_type`` records (type ids count from 1) and a string section.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingFeature

__all__ = ["VMLINUX", "Member", "Btf", "load_vmlinux"]

VMLINUX = Path("/sys/kernel/btf/vmlinux")

_MAGIC = 0xEB9F
# BTF_KIND_*
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC, _FUNC_PROTO, _VAR, _DATASEC = 9, 10, 11, 12, 13, 14, 15
_FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = 16, 17, 18, 19
_MODIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)
# Bytes that follow struct btf_type: fixed per kind, or per vlen item.
_FIXED = {_INT: 4, _ARRAY: 12, _VAR: 4, _DECL_TAG: 4}
_PER_ITEM = {_STRUCT: 12, _UNION: 12, _ENUM: 8, _FUNC_PROTO: 8, _DATASEC: 12, _ENUM64: 12}


@dataclass(frozen=True)
class Member:
    """One member of a struct: byte offset, and the member's (unmodified) type id."""

    name: str
    offset: int  # bytes from the start of the struct
    type_id: int


class Btf:
    """Parsed type section. Types are kept as (kind, name, size_or_type, items) tuples."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise ValueError("BTF blob too short")
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != _MAGIC:
            raise ValueError(f"not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<4I", data, 8)
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._types: list[tuple[int, int, int, int, int]] = [(0, 0, 0, 0, 0)]  # id 0 = void
        self._data = data
        self._by_name: dict[tuple[int, str], int] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, size_type = struct.unpack_from("<3I", data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            items = pos + 12
            pos = items + _FIXED.get(kind, 0) + _PER_ITEM.get(kind, 0) * vlen
            self._types.append((kind, name_off, size_type, items, info))

    def _str(self, off: int) -> str:
        return self._strings[off : self._strings.index(b"\0", off)].decode()

    def find(self, kind: int, name: str) -> int | None:
        """The id of the first type of this kind and name, or None."""
        if not self._by_name:
            for tid, (k, name_off, *_rest) in enumerate(self._types):
                if name_off:
                    self._by_name.setdefault((k, self._str(name_off)), tid)
        return self._by_name.get((kind, name))

    def _strip(self, tid: int) -> int:
        while self._types[tid][0] in _MODIFIERS:
            tid = self._types[tid][2]
        return tid

    def members(self, struct_name: str) -> dict[str, Member]:
        """Named members of ``struct struct_name`` (anonymous unions/structs flattened)."""
        tid = self.find(_STRUCT, struct_name)
        if tid is None:
            raise KeyError(f"struct {struct_name} not in BTF")
        return self._members(tid, 0)

    def _members(self, tid: int, base: int) -> dict[str, Member]:
        kind, _name, _size, items, info = self._types[tid]
        out: dict[str, Member] = {}
        for i in range(info & 0xFFFF):
            name_off, mtype, moff = struct.unpack_from("<3I", self._data, items + 12 * i)
            bits = moff & 0xFFFFFF if info >> 31 else moff  # kind_flag: bitfield size in top 8
            offset = base + bits // 8
            inner = self._strip(mtype)
            if not name_off and self._types[inner][0] in (_STRUCT, _UNION):
                out.update(self._members(inner, offset))
            elif name_off:
                out[self._str(name_off)] = Member(self._str(name_off), offset, inner)
        return out

    def offsetof(self, struct_name: str, path: str) -> int:
        """Byte offset of a dotted member path: ``offsetof("kvm_vcpu", "dirty_ring.index")``."""
        total = 0
        members = self.members(struct_name)
        where = f"struct {struct_name}"
        for part in path.split("."):
            if part not in members:
                raise KeyError(f"{where} has no member {part}")
            m = members[part]
            total += m.offset
            members, where = self._members(m.type_id, 0), part
        return total

    def has_func(self, name: str) -> bool:
        """Whether BTF describes a kernel function of that name (e.g. the ``bpf_loop``
        helper, Linux >= 5.17)."""
        return self.find(_FUNC, name) is not None

    def type_name(self, tid: int) -> str:
        """A C-ish spelling of a type id: ``struct kvm_dirty_ring *``, ``u32``, ``void``."""
        kind, name_off, size_type, _items, _info = self._types[tid]
        if tid == 0:
            return "void"
        if kind == _PTR:
            return self.type_name(size_type) + " *"
        if kind in (_CONST, _VOLATILE, _RESTRICT, _TYPE_TAG):
            return self.type_name(size_type)
        prefix = {_STRUCT: "struct ", _UNION: "union ", _ENUM: "enum ", _FWD: "struct "}
        return prefix.get(kind, "") + (self._str(name_off) if name_off else "?")

    def tracepoint_proto(self, event: str) -> list[tuple[str, str]]:
        """TP_PROTO of a tracepoint as [(type, name)], from typedef ``btf_trace_<event>``.

        Raises KeyError when the kernel's BTF does not describe the tracepoint.
        """
        tid = self.find(_TYPEDEF, f"btf_trace_{event}")
        if tid is None:
            raise KeyError(f"btf_trace_{event} not in BTF")
        ptr = self._types[tid][2]
        if self._types[ptr][0] != _PTR:
            raise KeyError(f"btf_trace_{event} is not a function pointer")
        proto = self._types[ptr][2]
        kind, _n, _ret, items, info = self._types[proto]
        if kind != _FUNC_PROTO:
            raise KeyError(f"btf_trace_{event} is not a function pointer")
        params = []
        for i in range(info & 0xFFFF):
            name_off, ptype = struct.unpack_from("<2I", self._data, items + 8 * i)
            params.append((self.type_name(ptype), self._str(name_off) if name_off else ""))
        return params[1:]  # drop void *__data


def load_vmlinux(path: Path = VMLINUX) -> Btf:
    """Parse the running kernel's BTF; MissingFeature when the kernel exposes none."""
    try:
        return Btf(path.read_bytes())
    except FileNotFoundError:
        raise MissingFeature(
            f"no kernel BTF at {path}",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y, or pass hook='tp'",
        ) from None
    except ValueError as err:
        raise MissingFeature(f"unreadable BTF at {path}: {err}", "pass hook='tp'") from None
