"""Run-time statistics of loaded BPF programs: how many times each ran and for how long.

The kernel counts ``run_cnt`` and ``run_time_ns`` in ``struct bpf_prog_info`` only while the
sysctl ``kernel.bpf_stats_enabled`` is 1 (Linux >= 5.1); :func:`bpf_stats` turns it on for a
``with`` block, says so on stderr, and restores the previous value. The figures include the
statistics' own cost (two clock reads per run), so they are an upper bound of a program's
cost.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..host.bpf_syscall import prog_info

__all__ = ["ProgStats", "prog_stats", "bpf_stats"]

SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


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
    info = prog_info(fd)
    return ProgStats(info.name.decode(errors="replace"), int(info.run_cnt),
                     int(info.run_time_ns))


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
