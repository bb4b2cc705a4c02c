"""A kernel-side producer for tests and benchmarks: run a loaded BPF program in the kernel
with ``BPF_PROG_TEST_RUN`` (:mod:`kvmtrace.host.bpf_syscall`), e.g. one that submits
records to a ring buffer, without any event source.
"""

from __future__ import annotations

import ctypes

from ..host.bpf_syscall import BpfCmd, ProgTestRunAttr, bpf

__all__ = ["prog_test_run", "raw_tp_test_run"]


def prog_test_run(prog_fd: int, data: bytes = b"\0" * 64, repeat: int = 1) -> tuple[int, int]:
    """Run BPF program ``prog_fd`` ``repeat`` times in the kernel on packet ``data``.

    Socket-filter/XDP programs take a packet of at least 14 bytes. Returns (the program's
    return value, mean ns per run). The GIL is released during the syscall, so another
    thread can consume meanwhile. Raises :class:`OSError` with the kernel's errno.
    """
    buf = ctypes.create_string_buffer(data, len(data))
    attr = ProgTestRunAttr(prog_fd=prog_fd, data_size_in=len(data),
                           data_in=ctypes.addressof(buf), repeat=repeat)
    bpf(BpfCmd.PROG_TEST_RUN, attr)
    return int(attr.retval), int(attr.duration)


def raw_tp_test_run(prog_fd: int, args: tuple[int, ...]) -> int:
    """Run raw tracepoint program ``prog_fd`` once in the kernel, on the calling thread's
    CPU, with ``args`` as its ``struct bpf_raw_tracepoint_args`` (u64 each); returns its
    return value. Pin the thread first (``os.sched_setaffinity``) to choose the CPU: the
    kernel's own ``BPF_F_TEST_RUN_ON_CPU`` runs it from an interrupt on that CPU, where
    the current task, and so the program's pid, is whatever ran there."""
    ctx = (ctypes.c_uint64 * len(args))(*args)
    attr = ProgTestRunAttr(prog_fd=prog_fd, ctx_size_in=ctypes.sizeof(ctx),
                           ctx_in=ctypes.addressof(ctx))
    bpf(BpfCmd.PROG_TEST_RUN, attr)
    return int(attr.retval)
