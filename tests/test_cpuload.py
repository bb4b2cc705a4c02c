"""kvmtrace.host.cpuload: idle CPUs from /proc/stat (the default of ``replay -j``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import require

from kvmtrace.host.cpuload import cpu_ticks, idle_cpus, idle_share

STAT_A = """cpu  300 10 150 1000 5 0 3 0 0 0
cpu0 100 5 50 900 5 0 1 0 0 0
cpu1 200 5 100 100 0 0 2 0 7 0
intr 1 2 3
ctxt 99
"""
STAT_B = """cpu  400 10 250 1100 5 0 3 0 0 0
cpu0 100 5 50 1000 5 0 1 0 0 0
cpu1 300 5 200 100 0 0 2 0 9 0
"""


def _online() -> set[int]:
    """The online CPUs as /sys says (e.g. ``0-1,4``)."""
    cpus: set[int] = set()
    with open("/sys/devices/system/cpu/online") as f:
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def test_ticks_and_shares_from_the_kernels_text() -> None:
    a, b = cpu_ticks(STAT_A), cpu_ticks(STAT_B)
    # idle + iowait, and the first 8 fields (guest is inside user)
    assert a == {0: (905, 1061), 1: (100, 407)}
    assert b == {0: (1005, 1161), 1: (100, 607)}
    assert idle_share(a, b, [0, 1]) == 1.0  # cpu0 all idle, cpu1 all busy
    assert idle_share(a, b, [1]) == 0.0
    assert idle_share(a, a, [0, 1, 7]) == 3.0  # no ticks moved, cpu7 unknown: idle


def test_every_online_cpu_has_a_line() -> None:
    with open("/proc/stat") as f:
        assert set(cpu_ticks(f.read())) == _online()


def test_a_cpu_kept_busy_is_not_idle() -> None:
    """A child spinning on one CPU (pinned there) leaves that CPU no idle tick while it
    runs, whatever else the host does; the share of all CPUs is between 0 and their
    number."""
    cpus = sorted(os.sched_getaffinity(0))
    require(len(cpus) >= 1, "no CPU to pin to")
    cpu = cpus[-1]
    spin = subprocess.Popen([sys.executable, "-c",
                             f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        time.sleep(0.3)  # pinned and spinning
        with open("/proc/stat") as f:
            before = cpu_ticks(f.read())
        time.sleep(0.5)
        with open("/proc/stat") as f:
            after = cpu_ticks(f.read())
        assert idle_share(before, after, [cpu]) == 0.0
        share = idle_cpus(cpus, 0.1)
        assert 0.0 <= share <= len(cpus) - 1 + 1e-9  # the spinning CPU is not idle
    finally:
        spin.kill()
        spin.wait()
