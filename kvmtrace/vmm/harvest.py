"""One VM's harvesting: collect DIRTY entries, mark them RESET, KVM_RESET_DIRTY_RINGS.

Every harvest + reset of a VM runs under one lock (the ioctl acts on all of the VM's
rings). After each call the rings are read back (:mod:`.reset`) to learn how many entries
the kernel reset in each ring; a call a signal cut short is retried until every harvested
entry the kernel can reach is reset (``reset_eintr`` counts the interrupted calls).
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque

from ..errors import KvmtraceError
from .helpers import ResetInterrupter
from .reset import attribute_reset, reset_run
from .truth import RingTruth
from .vm import Vcpu, Vm, describe_oserror

__all__ = ["RingState", "Harvester", "MAX_RESET_RETRIES"]

MAX_RESET_RETRIES = 10_000


class RingState:
    """Mutable per-vCPU bookkeeping: the result fields plus harvest state.

    ``full_mark``: ``res.harvested`` at this vCPU's previous exit 31 (livelock check).
    """

    def __init__(self, vcpu: Vcpu, res: RingTruth, keep: bool) -> None:
        self.vcpu = vcpu
        self.res = res
        self.seen: set[tuple[int, int]] = set()
        self.log: list[tuple[int, int]] | None = [] if keep else None
        self.full_mark = -1
        self.done = False


class Harvester:
    """Harvest + reset of one VM under its lock; counts resets and reaper cycles."""

    def __init__(self, vm: Vm, rings: list[RingState], delay_s: float,
                 interrupter: ResetInterrupter | None = None) -> None:
        self.vm, self.rings, self.delay_s = vm, rings, delay_s
        self.interrupter = interrupter
        self.lock = threading.Lock()
        self.cycle = threading.Condition()
        self.cycles = 0
        self.resets = 0
        self.reset_returned = 0
        self.reset_eintr = 0
        self.reset_errno_eintr = 0  # calls that failed with EINTR (6.16-6.18 never do)
        self.reset_mismatch = 0
        self.mismatches: list[tuple[int, list[int], list[int]]] = []
        self.history: deque[tuple[object, ...]] = deque(maxlen=8)  # last calls, for bugs

    def harvest(self, rings: list[RingState], always_reset: bool) -> int:
        """Harvest ``rings`` then KVM_RESET_DIRTY_RINGS (if ``always_reset`` or any entry
        was harvested). Returns the number of entries harvested."""
        if self.delay_s:
            time.sleep(self.delay_s)
        total = 0
        with self.lock:
            for ring in rings:
                entries = ring.vcpu.ring.harvest()
                ring.res.harvested += len(entries)
                ring.seen.update(entries)
                if ring.log is not None:
                    ring.log.extend(entries)
                total += len(entries)
            if total or always_reset:
                self._reset()
        return total

    def _call(self) -> tuple[int | None, bool]:
        """One ioctl: (return value or None on EINTR, whether errno was EINTR)."""
        token = self.interrupter.entering() if self.interrupter else 0
        try:
            return self.vm.reset_dirty_rings(), False
        except OSError as err:
            if err.errno != errno.EINTR:
                raise describe_oserror("KVM_RESET_DIRTY_RINGS", err) from None
            return None, True
        finally:
            if self.interrupter:
                self.interrupter.left(token)

    def _reset(self) -> None:
        """KVM_RESET_DIRTY_RINGS until no call is cut short by a signal (lock held).

        Each ring's walk starts at the kernel's ``reset_index``, which is the ring's
        ``entries_reset`` so far; what a call reset is read back from the rings
        (:func:`.reset.attribute_reset`). When only one ring had entries to reset, the
        ioctl's return value is that ring's count (it also settles the one case the flags
        cannot: every entry of the run pushed over during the call)."""
        for _ in range(MAX_RESET_RETRIES):
            starts = [r.res.entries_reset for r in self.rings]
            runs = [reset_run(r.vcpu.ring, r.res.entries_reset,
                              r.res.harvested - r.res.entries_reset) for r in self.rings]
            returned, eintr = self._call()
            self.resets += 1
            out = attribute_reset([(r.vcpu.ring, start, run) for r, start, run
                                   in zip(self.rings, starts, runs, strict=True)])
            per_ring = out.per_ring
            if returned is not None and returned != out.total:
                holders = [i for i, n in enumerate(runs) if n]
                if len(holders) == 1 and returned <= runs[holders[0]]:
                    per_ring = [returned if i == holders[0] else 0 for i in range(len(runs))]
                else:
                    self.reset_mismatch += 1
                    if len(self.mismatches) < 16:
                        self.mismatches.append((returned, out.per_ring, runs))
            self.history.append((starts, runs, returned, out.per_ring, out.interrupted_at))
            for i, (ring, count) in enumerate(zip(self.rings, per_ring, strict=True)):
                ring.res.entries_reset += count
                if i < out.visited and (out.interrupted_at is not None or not eintr):
                    ring.res.reset_events += 1
            if returned is not None:
                self.reset_returned += returned
            if out.interrupted_at is None and not eintr:
                return
            self.reset_eintr += 1
            self.reset_errno_eintr += eintr
        raise KvmtraceError(f"KVM_RESET_DIRTY_RINGS was interrupted {MAX_RESET_RETRIES} "
                            "times in a row", "send fewer signals to the harvesting thread")

    def reaper_cycle(self) -> None:
        self.harvest(self.rings, always_reset=False)
        with self.cycle:
            self.cycles += 1
            self.cycle.notify_all()

    def wait_for_reaper(self, ring: RingState, stop: threading.Event) -> int:
        """Lazy mode: block until the reaper completes a cycle; entries it took from ring."""
        before = ring.res.harvested
        with self.cycle:
            target = self.cycles + 1
            while self.cycles < target and not stop.is_set():
                self.cycle.wait(0.05)
        return ring.res.harvested - before
