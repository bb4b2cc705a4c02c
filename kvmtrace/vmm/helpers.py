"""Side threads of a workload run: the reset interrupter and the vCPU migrator.

``ResetInterrupter`` sends a signal (handled by a no-op handler) to the thread inside
KVM_RESET_DIRTY_RINGS at a random moment of the call, so that the kernel's walk (Linux
6.16+) stops part-way. ``Migrator`` re-pins every vCPU thread to another CPU every period
(``sched_setaffinity`` on the thread's native tid), so one ring's events come from
alternating CPUs.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable

__all__ = ["ResetInterrupter", "Migrator", "usable_cpus"]


class ResetInterrupter:
    """Signals the thread inside a VM's reset ioctl, at most once per call.

    The harvester brackets the ioctl with ``entering()`` / ``left(token)``; ``main(stop)``
    runs in its own thread. The delay after entry is drawn from [0, 0.8 x the last call's
    duration], so most signals land inside the kernel's walk.
    """

    def __init__(self, signum: int, seed: int = 0) -> None:
        self.signum = signum
        self.sent = 0
        self._cond = threading.Condition()
        self._token = 0
        self._current: tuple[int, int, float] | None = None  # token, thread ident, start
        self._last_s = 0.0005
        self._rng = random.Random(f"kvmtrace-interrupt:{seed}")

    def entering(self) -> int:
        with self._cond:
            self._token += 1
            self._current = (self._token, threading.get_ident(), time.monotonic())
            self._cond.notify_all()
            return self._token

    def left(self, token: int) -> None:
        with self._cond:
            if self._current and self._current[0] == token:
                self._last_s = max(time.monotonic() - self._current[2], 1e-5)
                self._current = None
            self._cond.notify_all()

    def main(self, stop: threading.Event) -> None:
        seen = 0
        while not stop.is_set():
            with self._cond:
                while not stop.is_set() and (self._current is None
                                             or self._current[0] == seen):
                    self._cond.wait(0.05)
                if stop.is_set() or self._current is None:
                    continue
                token, ident, _ = self._current
                delay = self._rng.uniform(0.0, 0.8 * self._last_s)
            seen = token
            if delay > 2e-5:
                time.sleep(delay)
            with self._cond:
                if self._current and self._current[0] == token:
                    try:
                        signal.pthread_kill(ident, self.signum)
                        self.sent += 1
                    except ProcessLookupError:
                        pass


def usable_cpus() -> list[int]:
    """CPUs this process may run on (its affinity mask), sorted."""
    return sorted(os.sched_getaffinity(0))


class Migrator:
    """Every ``period_s``, pin thread ``i`` (of ``tids()``) to ``cpus[(i + step) % n]``.

    ``tids()`` returns the native tids (0 = not started or finished: skipped). Per thread,
    ``moves[i]`` counts re-pins that changed its CPU and ``cpus[i]`` the CPUs it was on.
    """

    def __init__(self, period_s: float, tids: Callable[[], list[int]], cpus: list[int]) -> None:
        self.period_s, self._tids, self._cpu_list = period_s, tids, cpus
        count = len(tids())
        self.moves = [0] * count
        self.cpus: list[set[int]] = [set() for _ in range(count)]
        self._last: list[int | None] = [None] * count

    def step(self, step: int) -> None:
        for i, tid in enumerate(self._tids()):
            if not tid:
                continue
            cpu = self._cpu_list[(i + step) % len(self._cpu_list)]
            try:
                os.sched_setaffinity(tid, {cpu})
            except OSError:  # the thread has just ended
                continue
            if self._last[i] is not None and self._last[i] != cpu:
                self.moves[i] += 1
            self._last[i] = cpu
            self.cpus[i].add(cpu)

    def main(self, stop: threading.Event) -> None:
        step = 0
        while True:
            self.step(step)
            step += 1
            if stop.wait(self.period_s):
                return
