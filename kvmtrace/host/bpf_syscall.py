"""The one ``bpf(2)`` shim: the syscall through ctypes, and the ``union bpf_attr`` members
kvmtrace passes to it, each as a ctypes structure.

``bpf(cmd, &attr, sizeof(attr))``: the kernel reads ``sizeof(attr)`` bytes and requires any
bytes past the fields it knows to be zero, so a structure here may stop after the last field
we use. Layouts from include/uapi/linux/bpf.h; the kernel version that first accepts each
command (and field) is given with it:

========================  ===  =====  =================================================
command                   cmd  since  attr member used here
========================  ===  =====  =================================================
BPF_MAP_CREATE              0  3.18   :class:`MapCreateAttr` (ringbuf maps: 5.8; inner
                                      maps 4.12; map_name 4.15)
BPF_MAP_LOOKUP_ELEM         1  3.18   :class:`MapElemAttr`
BPF_MAP_UPDATE_ELEM         2  3.18   :class:`MapElemAttr`
BPF_MAP_DELETE_ELEM         3  3.18   :class:`MapElemAttr`
BPF_MAP_GET_NEXT_KEY        4  3.18   :class:`MapElemAttr` (``value`` = next key)
BPF_PROG_LOAD               5  3.18   :class:`ProgLoadAttr` (expected_attach_type 4.17,
                                      attach_btf_id 5.5)
BPF_PROG_TEST_RUN          10  4.12   :class:`ProgTestRunAttr` (ctx_in 5.2; flags, cpu
                                      5.10, as raw tracepoint programs; batch_size 5.18)
BPF_OBJ_GET_INFO_BY_FD     15  4.13   :class:`ObjInfoAttr` over a :class:`MapInfo` or a
                                      :class:`ProgInfo` (run_time_ns, run_cnt: 5.1)
BPF_RAW_TRACEPOINT_OPEN    17  4.17   :class:`RawTracepointOpenAttr`
BPF_MAP_LOOKUP_BATCH       24  5.6    :class:`MapBatchAttr`
========================  ===  =====  =================================================

:func:`bpf` raises :class:`OSError` (errno set; ENOSYS where the syscall number of this
architecture is not known here) and returns the syscall's value (a new fd for the commands
that make one). No bcc involved: these work before and without a BPF compiler.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import platform

__all__ = [
    "BpfCmd",
    "ProgType",
    "AttachType",
    "MAP_TYPE_RINGBUF",
    "MapCreateAttr",
    "MapElemAttr",
    "ProgLoadAttr",
    "ProgTestRunAttr",
    "ObjInfoAttr",
    "MapInfo",
    "ProgInfo",
    "RawTracepointOpenAttr",
    "MapBatchAttr",
    "bpf",
    "map_create",
    "map_lookup",
    "map_update",
    "map_delete",
    "map_next_key",
    "prog_load",
    "raw_tracepoint_open",
    "map_info",
    "prog_info",
]

# __NR_bpf per machine (arch/*/ syscall tables)
_NR_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "s390x": 351, "ppc64le": 361}


class BpfCmd(enum.IntEnum):
    """``enum bpf_cmd``: the commands used here."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    PROG_TEST_RUN = 10
    OBJ_GET_INFO_BY_FD = 15
    RAW_TRACEPOINT_OPEN = 17
    MAP_LOOKUP_BATCH = 24


class ProgType(enum.IntEnum):
    """``enum bpf_prog_type``: the program types loaded here."""

    TRACEPOINT = 5
    RAW_TRACEPOINT = 17
    TRACING = 26


class AttachType(enum.IntEnum):
    """``enum bpf_attach_type``: the attach types used here."""

    NONE = 0
    TRACE_FENTRY = 24


MAP_TYPE_RINGBUF = 27  # enum bpf_map_type BPF_MAP_TYPE_RINGBUF


class MapCreateAttr(ctypes.Structure):
    """``union bpf_attr``, BPF_MAP_CREATE member, up to ``map_name`` (48 of 72 bytes; the
    rest stays zero: no map_ifindex, BTF)."""

    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),  # bytes
        ("value_size", ctypes.c_uint32),  # bytes
        ("max_entries", ctypes.c_uint32),  # ringbuf: data bytes, a power-of-two of pages
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),  # map-in-map: a map shaped like the elements
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),  # BPF_OBJ_NAME_LEN, NUL-terminated
    ]


class MapElemAttr(ctypes.Structure):
    """``union bpf_attr``, BPF_MAP_*_ELEM / GET_NEXT_KEY member (32 bytes). ``value`` is
    ``next_key`` for BPF_MAP_GET_NEXT_KEY (the same union slot)."""

    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),  # user address, key_size bytes (0: first key)
        ("value", ctypes.c_uint64),  # user address; per-CPU maps: round_up(size, 8) * CPUs
        ("flags", ctypes.c_uint64),  # BPF_ANY 0, BPF_NOEXIST 1, BPF_EXIST 2
    ]


class ProgLoadAttr(ctypes.Structure):
    """``union bpf_attr``, BPF_PROG_LOAD member, up to ``attach_btf_id`` (offset 108)."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),  # 8-byte ``struct bpf_insn`` count
        ("insns", ctypes.c_uint64),  # user address
        ("license", ctypes.c_uint64),  # user address of a NUL-terminated string
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),  # offset 68
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),  # offset 108: BTF type id of the hooked function
    ]


class ProgTestRunAttr(ctypes.Structure):
    """``union bpf_attr``, BPF_PROG_TEST_RUN member (80 bytes). ``retval`` and
    ``duration`` (mean ns per run) are written back by the kernel."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),  # bytes
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),  # user address
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),  # ns per run, averaged
        ("ctx_size_in", ctypes.c_uint32),  # bytes; a raw tracepoint program's u64 args
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class MapInfo(ctypes.Structure):
    """The head of ``struct bpf_map_info`` (the kernel fills ``info_len`` bytes of it)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("_rest", ctypes.c_uint8 * 64),
    ]


class ProgInfo(ctypes.Structure):
    """``struct bpf_prog_info`` up to ``verified_insns`` (220 bytes); the run counters grow
    only while sysctl ``kernel.bpf_stats_enabled`` is 1; ``verified_insns`` (Linux >= 5.16,
    else 0): instructions the verifier processed to load the program."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("_head", ctypes.c_uint8 * 48),
        ("name", ctypes.c_char * 16),  # offset 64
        ("_mid", ctypes.c_uint8 * 112),
        ("run_time_ns", ctypes.c_uint64),  # offset 192: total ns in the program
        ("run_cnt", ctypes.c_uint64),  # runs
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),  # offset 216
    ]


class ObjInfoAttr(ctypes.Structure):
    """``union bpf_attr``, BPF_OBJ_GET_INFO_BY_FD member."""

    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]  # user address of a ``struct bpf_*_info``


class RawTracepointOpenAttr(ctypes.Structure):
    """``union bpf_attr``, BPF_RAW_TRACEPOINT_OPEN member (16 bytes)."""

    _fields_ = [("name", ctypes.c_uint64),  # user address of the tracepoint's name
                ("prog_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class MapBatchAttr(ctypes.Structure):
    """``union bpf_attr``, BPF_MAP_*_BATCH member (56 bytes). ``count`` goes in as the
    room in ``keys``/``values`` and comes back as the elements copied."""

    _fields_ = [
        ("in_batch", ctypes.c_uint64),  # user address of the resume token; 0: from the start
        ("out_batch", ctypes.c_uint64),  # user address the next token is written to
        ("keys", ctypes.c_uint64),  # user address, count * key_size bytes
        ("values", ctypes.c_uint64),  # user address, count * value_size bytes
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd: BpfCmd | int, attr: ctypes.Structure) -> int:
    """``bpf(cmd, &attr, sizeof(attr))``: the return value (>= 0; an fd for commands that
    make one, owned by the caller). Raises :class:`OSError` with the kernel's errno."""
    nr = _NR_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(int(cmd)), ctypes.byref(attr),
                        ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({_cmd_name(cmd)}): {os.strerror(err)}")
    return int(ret)


def _cmd_name(cmd: int) -> str:
    try:
        return f"BPF_{BpfCmd(cmd).name}"
    except ValueError:
        return f"cmd {cmd}"



def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, *,
               flags: int = 0, inner_map_fd: int = 0, name: bytes = b"") -> int:
    """BPF_MAP_CREATE: a new map's fd (``name``: up to 15 bytes are kept)."""
    return bpf(BpfCmd.MAP_CREATE,
               MapCreateAttr(map_type, key_size, value_size, max_entries, flags,
                             inner_map_fd, 0, name[:15]))


def _elem(cmd: BpfCmd, map_fd: int, key: ctypes.Array | None, value: ctypes.Array | None,
          flags: int = 0) -> int:
    return bpf(cmd, MapElemAttr(map_fd, 0, 0 if key is None else ctypes.addressof(key),
                                0 if value is None else ctypes.addressof(value), flags))


def _found(cmd: BpfCmd, map_fd: int, key: ctypes.Array | None,
           value: ctypes.Array | None) -> bool:
    """Run a map command; False where the kernel says there is no such key (ENOENT)."""
    try:
        _elem(cmd, map_fd, key, value)
    except OSError as err:
        if err.errno == errno.ENOENT:
            return False
        raise
    return True


def map_lookup(map_fd: int, key: bytes, value_bytes: int) -> bytes | None:
    """BPF_MAP_LOOKUP_ELEM: the value (``value_bytes`` long) or None where there is none."""
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_bytes)
    return v.raw if _found(BpfCmd.MAP_LOOKUP_ELEM, map_fd, k, v) else None


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    """BPF_MAP_UPDATE_ELEM (``flags``: BPF_ANY 0, BPF_NOEXIST 1, BPF_EXIST 2)."""
    _elem(BpfCmd.MAP_UPDATE_ELEM, map_fd, ctypes.create_string_buffer(key, len(key)),
          ctypes.create_string_buffer(value, len(value)), flags)


def map_delete(map_fd: int, key: bytes) -> bool:
    """BPF_MAP_DELETE_ELEM: True deleted, False there was no such key."""
    return _found(BpfCmd.MAP_DELETE_ELEM, map_fd, ctypes.create_string_buffer(key, len(key)),
                  None)


def map_next_key(map_fd: int, key: bytes | None, key_bytes: int) -> bytes | None:
    """BPF_MAP_GET_NEXT_KEY: the key after ``key`` (None: the first), None at the end."""
    nxt = ctypes.create_string_buffer(key_bytes)
    k = None if key is None else ctypes.create_string_buffer(key, len(key))
    return nxt.raw if _found(BpfCmd.MAP_GET_NEXT_KEY, map_fd, k, nxt) else None


def prog_load(prog_type: ProgType | int, insns: bytes, *, license: bytes = b"GPL",
              expected_attach_type: AttachType = AttachType.NONE,
              attach_btf_id: int = 0, name: bytes = b"", kern_version: int = 0,
              log: ctypes.Array | None = None) -> int:
    """BPF_PROG_LOAD of ``insns`` (8-byte ``struct bpf_insn`` each): the program's fd.
    ``log``: a buffer for the verifier's messages (log level 1) when the load fails."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    attr = ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8,
                        insns=ctypes.addressof(code), license=ctypes.addressof(lic),
                        kern_version=kern_version, prog_name=name[:15],
                        expected_attach_type=expected_attach_type, attach_btf_id=attach_btf_id)
    if log is not None:
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
    return bpf(BpfCmd.PROG_LOAD, attr)


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """BPF_RAW_TRACEPOINT_OPEN: attach ``prog_fd`` to tracepoint ``name``; the link's fd
    (closing it detaches)."""
    buf = ctypes.create_string_buffer(name.encode())
    return bpf(BpfCmd.RAW_TRACEPOINT_OPEN,
               RawTracepointOpenAttr(name=ctypes.addressof(buf), prog_fd=prog_fd))


def map_info(map_fd: int) -> MapInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a map fd: its ``struct bpf_map_info`` head."""
    info = MapInfo()
    bpf(BpfCmd.OBJ_GET_INFO_BY_FD,
        ObjInfoAttr(map_fd, ctypes.sizeof(info), ctypes.addressof(info)))
    return info


def prog_info(prog_fd: int) -> ProgInfo:
    """BPF_OBJ_GET_INFO_BY_FD on a program fd: its ``struct bpf_prog_info`` head."""
    info = ProgInfo()
    bpf(BpfCmd.OBJ_GET_INFO_BY_FD,
        ObjInfoAttr(prog_fd, ctypes.sizeof(info), ctypes.addressof(info)))
    return info
