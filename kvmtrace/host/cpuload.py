"""How much of the CPUs this process may use is idle now, from ``/proc/stat``.

``/proc/stat`` (Documentation/filesystems/proc.rst, "1.7 Miscellaneous kernel statistics")
has a line per CPU, ``cpuN user nice system idle iowait irq softirq steal guest
guest_nice``, cumulative, in USER_HZ ticks (10 ms here); ``guest`` and ``guest_nice`` are
already counted in ``user`` and ``nice``. A CPU's idle share over an interval is its
``idle + iowait`` ticks over all its ticks. Two reads 100 ms apart give each CPU's share
to one tick in ten.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

__all__ = ["cpu_ticks", "idle_cpus", "idle_share"]

PROC_STAT = "/proc/stat"


def cpu_ticks(text: str) -> dict[int, tuple[int, int]]:
    """CPU number -> (idle + iowait ticks, all ticks) from the text of ``/proc/stat``."""
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if not name[3:].isdigit():
            continue
        t = [int(x) for x in fields[:8]]  # guest, guest_nice: inside user, nice
        out[int(name[3:])] = (t[3] + t[4], sum(t))
    return out


def idle_share(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]],
               cpus: Iterable[int]) -> float:
    """How many CPUs' worth of ``cpus`` was idle between the two reads (0 .. len(cpus));
    a CPU whose ticks did not move (or that is missing) counts as idle."""
    idle = 0.0
    for c in cpus:
        if c not in before or c not in after:
            idle += 1.0
            continue
        d_idle = after[c][0] - before[c][0]
        d_all = after[c][1] - before[c][1]
        idle += 1.0 if d_all <= 0 else min(1.0, max(0.0, d_idle / d_all))
    return idle


def idle_cpus(cpus: Iterable[int] | None = None, seconds: float = 0.1, *,
              read: Callable[[], str] | None = None) -> float:
    """CPUs' worth of ``cpus`` (default: those this process may run on) idle over the next
    ``seconds``; the number of CPUs when ``/proc/stat`` cannot be read."""
    chosen = sorted(os.sched_getaffinity(0) if cpus is None else cpus)

    def _read() -> str:
        with open(PROC_STAT) as f:
            return f.read()

    get = read or _read
    try:
        before = cpu_ticks(get())
        time.sleep(seconds)
        after = cpu_ticks(get())
    except OSError:
        return float(len(chosen))
    return idle_share(before, after, chosen)
