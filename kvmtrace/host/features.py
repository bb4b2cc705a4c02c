"""Feature probes: which BPF program types and hooks the running kernel accepts.

Each probe asks the kernel directly through the ``bpf(2)`` syscall
(:mod:`kvmtrace.host.bpf_syscall`) with a two-instruction program (``r0 = 0; exit``), so
the answer costs microseconds and needs no compiler:

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

import os
from dataclasses import dataclass
from functools import cache

from . import tracefs
from .bpf_syscall import (
    MAP_TYPE_RINGBUF,
    AttachType,
    ProgType,
    map_create,
    prog_load,
    raw_tracepoint_open,
)

__all__ = ["Features", "detect", "raw_tp_attachable"]

_RET0 = bytes.fromhex("b700000000000000" "9500000000000000")  # r0 = 0; exit


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


def raw_tp_attachable(event: str) -> tuple[bool, str]:
    """Can a raw tracepoint program be attached to ``event``? (ok, errno text)."""
    try:
        fd = prog_load(ProgType.RAW_TRACEPOINT, _RET0)
    except OSError as err:
        return False, os.strerror(err.errno)
    try:
        os.close(raw_tracepoint_open(event, fd))
        return True, ""
    except OSError as err:
        return False, os.strerror(err.errno)
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
    try:
        os.close(prog_load(ProgType.TRACING, _RET0,
                           expected_attach_type=AttachType.TRACE_FENTRY, attach_btf_id=btf_id))
    except OSError as err:
        return False, os.strerror(err.errno)
    return True, ""


def _ringbuf() -> tuple[bool, str]:
    try:
        os.close(map_create(MAP_TYPE_RINGBUF, 0, 0, 4096))
    except OSError as err:
        return False, os.strerror(err.errno)
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
