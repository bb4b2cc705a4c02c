"""Run-time statistics of loaded BPF programs: how many times each ran and for how long.

The kernel counts ``run_cnt`` and ``run_time_ns`` in ``struct bpf_prog_info`` only while the
sysctl ``kernel.bpf_stats_enabled`` is 1 (Linux >= 5.1); :func:`bpf_stats` turns it on for a
``with`` block, says so on stderr, and restores the previous value. The figures include the
statistics' own cost (two clock reads per run), so they are an upper bound of a program's
cost.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProgStats", "prog_stats", "bpf_stats"]

SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_OBJ_GET_INFO_BY_FD = 15
# struct bpf_prog_info (include/uapi/linux/bpf.h): name[16] at 64, run_time_ns at 192,
# run_cnt at 200 (fields present since Linux 5.1)
_INFO_LEN = 208


@dataclass(frozen=True)
class ProgStats:
    name: str
    run_cnt: int
    run_time_ns: int

    @property
    def ns_per_run(self) -> float | None:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None


def prog_stats(fd: int) -> ProgStats:
    """Counters of the program behind ``fd`` (bpf(BPF_OBJ_GET_INFO_BY_FD))."""
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    info = ctypes.create_string_buffer(_INFO_LEN)
    attr = ctypes.create_string_buffer(struct.pack("IIQ", fd, _INFO_LEN,
                                                   ctypes.addressof(info)), 128)
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(f"bpf syscall number unknown on {os.uname().machine}")
    if libc.syscall(nr, _BPF_OBJ_GET_INFO_BY_FD, attr, 128) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_OBJ_GET_INFO_BY_FD: {os.strerror(err)}")
    raw = info.raw
    name = raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    run_time, run_cnt = struct.unpack_from("QQ", raw, 192)
    return ProgStats(name, run_cnt, run_time)


@contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled = 1 inside the block (announced), the old value after."""
    old = SYSCTL.read_text().strip()
    if old != "1":
        print(f"note: set {SYSCTL} to 1 for the measurement (restored to {old} after)",
              file=sys.stderr)
        SYSCTL.write_text("1")
    try:
        yield
    finally:
        if old != "1":
            SYSCTL.write_text(old)
