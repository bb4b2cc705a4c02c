"""Feature probes: which BPF program types and hooks the running kernel accepts.

Each probe asks the kernel directly through the ``bpf(2)`` syscall with a two-instruction
program (``r0 = 0; exit``), so the answer costs microseconds and needs no compiler:

- raw_tp: load a BPF_PROG_TYPE_RAW_TRACEPOINT program and attach it with
  BPF_RAW_TRACEPOINT_OPEN to ``kvm_dirty_ring_push`` (then detach).
- tracepoint: the event's ``format`` file exists in tracefs.
- kprobes: tracefs offers ``kprobe_events`` (CONFIG_KPROBES_EVENTS).
- fentry: load a BPF_PROG_TYPE_TRACING / BPF_TRACE_FENTRY program on the BTF function
  ``kvm_dirty_ring_push`` (refused with EPERM on some kernels even for root).
- ringbuf: create a BPF_MAP_TYPE_RINGBUF map of one page.

Nothing in kvmtrace depends on kprobes or fentry; they are reported for ``doctor``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from dataclasses import dataclass
from functools import cache

from . import tracefs

__all__ = ["Features", "detect", "raw_tp_attachable", "bpf_syscall"]

_BPF_NR = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "s390x": 351, "ppc64le": 361}
# enum bpf_cmd / bpf_prog_type / bpf_attach_type / bpf_map_type (include/uapi/linux/bpf.h)
_MAP_CREATE, _PROG_LOAD, _RAW_TRACEPOINT_OPEN = 0, 5, 17
_PROG_RAW_TRACEPOINT, _PROG_TRACING = 17, 26
_TRACE_FENTRY = 24
_MAP_RINGBUF = 27
_RET0 = bytes.fromhex("b700000000000000" "9500000000000000")  # r0 = 0; exit
_LICENSE = ctypes.create_string_buffer(b"GPL")


@dataclass(frozen=True)
class Features:
    """What the kernel accepts; ``errors`` holds the errno text of each failed probe."""

    raw_tracepoint: bool
    tracepoint: bool
    kprobes: bool
    fentry: bool
    ringbuf: bool
    btf: bool
    errors: dict[str, str]


_libc = ctypes.CDLL(None, use_errno=True)


def bpf_syscall(cmd: int, attr: bytes) -> tuple[int, int]:
    """bpf(cmd, attr, len(attr)) -> (return value, errno)."""
    nr = _BPF_NR.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = _libc.syscall(nr, cmd, buf, len(attr))
    return ret, (ctypes.get_errno() if ret < 0 else 0)


def _prog_load(prog_type: int, attach_type: int = 0, attach_btf_id: int = 0) -> tuple[int, int]:
    insns = ctypes.create_string_buffer(_RET0, len(_RET0))
    attr = bytearray(128)
    struct.pack_into("<IIQQ", attr, 0, prog_type, 2, ctypes.addressof(insns),
                     ctypes.addressof(_LICENSE))
    struct.pack_into("<I", attr, 68, attach_type)  # expected_attach_type
    struct.pack_into("<I", attr, 108, attach_btf_id)  # attach_btf_id
    return bpf_syscall(_PROG_LOAD, bytes(attr))


def raw_tp_attachable(event: str) -> tuple[bool, str]:
    """Can a raw tracepoint program be attached to ``event``? (ok, errno text)."""
    fd, err = _prog_load(_PROG_RAW_TRACEPOINT)
    if fd < 0:
        return False, os.strerror(err)
    try:
        name = ctypes.create_string_buffer(event.encode())
        link, err = bpf_syscall(_RAW_TRACEPOINT_OPEN,
                                struct.pack("<QI4x", ctypes.addressof(name), fd))
        if link < 0:
            return False, os.strerror(err)
        os.close(link)
        return True, ""
    finally:
        os.close(fd)


def _fentry(func: str) -> tuple[bool, str]:
    from ..errors import KvmtraceError
    from .btf import load_vmlinux

    try:
        btf_id = load_vmlinux().find(12, func)  # BTF_KIND_FUNC
    except (KvmtraceError, ValueError, OSError) as err:
        return False, str(err)
    if btf_id is None:
        return False, f"no BTF for {func}"
    fd, err = _prog_load(_PROG_TRACING, _TRACE_FENTRY, btf_id)
    if fd < 0:
        return False, os.strerror(err)
    os.close(fd)
    return True, ""


def _ringbuf() -> tuple[bool, str]:
    fd, err = bpf_syscall(_MAP_CREATE, struct.pack("<IIII", _MAP_RINGBUF, 0, 0, 4096) +
                          bytes(56))
    if fd < 0:
        return False, os.strerror(err)
    os.close(fd)
    return True, ""


@cache
def detect() -> Features:
    """Probe once per process (root needed for the BPF probes to succeed)."""
    errors: dict[str, str] = {}
    raw_tp, errors["raw_tracepoint"] = raw_tp_attachable("kvm_dirty_ring_push")
    fentry, errors["fentry"] = _fentry("kvm_dirty_ring_push")
    ringbuf, errors["ringbuf"] = _ringbuf()
    root = tracefs.find_tracefs()
    tp = tracefs.has_event("kvm", "kvm_dirty_ring_push", root)
    kprobes = root is not None and (root / "kprobe_events").exists()
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    return Features(
        raw_tracepoint=raw_tp,
        tracepoint=tp,
        kprobes=kprobes,
        fentry=fentry,
        ringbuf=ringbuf,
        btf=btf,
        errors={k: v for k, v in errors.items() if v},
    )
