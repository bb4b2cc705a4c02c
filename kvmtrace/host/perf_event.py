"""Attach a BPF program to a tracepoint the way the kernel has allowed since 4.7: open a
perf event on it (``perf_event_open(2)``, ``PERF_TYPE_TRACEPOINT``, config = the event's id
from tracefs), then ``PERF_EVENT_IOC_SET_BPF`` and ``PERF_EVENT_IOC_ENABLE``. One event on
CPU 0 for every process (pid -1) is enough: the program runs wherever the tracepoint fires.
Closing the returned fd detaches. No bcc involved.

``struct perf_event_attr`` is passed in its first published size (PERF_ATTR_SIZE_VER0, 64
bytes): type, size, config, sample_period, sample_type, read_format, the flag bits,
wakeup_events, bp_type, config1 (include/uapi/linux/perf_event.h).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform

from . import tracefs

__all__ = ["PerfEventAttr", "tracepoint_id", "attach_tracepoint"]

_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "s390x": 331,
                       "ppc64le": 319}
PERF_TYPE_TRACEPOINT = 2
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400  # _IO('$', 0)
PERF_EVENT_IOC_SET_BPF = 0x40042408  # _IOW('$', 8, __u32)


class PerfEventAttr(ctypes.Structure):
    """``struct perf_event_attr`` up to ``config1`` (PERF_ATTR_SIZE_VER0 = 64 bytes)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),  # tracepoint: the id in events/<system>/<name>/id
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),  # disabled, inherit, ... bits: all 0 here
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)


def tracepoint_id(system: str, name: str) -> int:
    """The id of tracepoint ``system:name`` (tracefs events/<system>/<name>/id)."""
    root = tracefs.require_tracefs()
    return int((root / "events" / system / name / "id").read_text())


def attach_tracepoint(prog_fd: int, system: str, name: str) -> int:
    """Run BPF program ``prog_fd`` (BPF_PROG_TYPE_TRACEPOINT) at every ``system:name``
    event; the perf event's fd (close it to detach). OSError with the kernel's errno."""
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"perf_event_open unknown on {platform.machine()}")
    attr = PerfEventAttr(type=PERF_TYPE_TRACEPOINT, size=ctypes.sizeof(PerfEventAttr),
                         config=tracepoint_id(system, name), sample_period=1, wakeup_events=1)
    fd = _libc.syscall(ctypes.c_long(nr), ctypes.byref(attr), ctypes.c_int(-1),
                       ctypes.c_int(0), ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open({system}:{name}): {os.strerror(err)}")
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError:
        os.close(fd)
        raise
    return int(fd)
