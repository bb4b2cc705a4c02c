"""kvmtrace.analysis.migration and .throttle on a hand-built event stream whose syncs,
pages and stalls are known by construction (no kernel needed)."""

from __future__ import annotations

import numpy as np

from kvmtrace.analysis.migration import find_migrations, reset_calls
from kvmtrace.analysis.throttle import stall_splits
from kvmtrace.core.events import Kind, empty

PID, VM, REAPER, VCPUS, SYNC = 1000, 7, 1001, (1002, 1003), 1050
MS = 1_000_000


class Stream:
    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.dirty = {0: 0, 1: 0}
        self.reset = {0: 0, 1: 0}

    def push(self, ts: int, ring: int, page: int) -> None:
        self.dirty[ring] += 1
        self.rows.append((ts, page, VCPUS[ring], self.dirty[ring], self.reset[ring], ring,
                          Kind.PUSH))

    def reset_all(self, ts: int, tid: int, dur: int = 50_000) -> None:
        for ring in (0, 1):
            self.reset[ring] = self.dirty[ring]
            self.rows.append((ts + ring, 0, tid, self.dirty[ring], self.reset[ring], ring,
                              Kind.RESET))
        self.rows.append((ts + dur, dur, tid, 0, 0, -1, Kind.RESET_LAT))

    def stall(self, end: int, dur: int, ring: int) -> None:
        self.rows.append((end, dur, VCPUS[ring], 0, 0, ring, Kind.STALL))

    def events(self) -> np.ndarray:
        ev = empty(len(self.rows))
        for i, (ts, value, tid, di, ri, ring, kind) in enumerate(self.rows):
            ev[i] = (ts, value, PID, tid, di, ri, 0, ring, VM, kind, b"\0\0\0")
        return ev[np.argsort(ev["ts"], kind="stable")]


def build() -> Stream:
    """Three syncs 100 ms apart; in window k each vCPU dirties pages 0..9 (ring 0) and
    100..109 (ring 1) twice; the reaper resets once in window 2."""
    s = Stream()
    for k in range(3):
        base = k * 100 * MS
        for rep in range(2):
            for p in range(10):
                s.push(base + (rep * 10 + p + 1) * MS, 0, p)
                s.push(base + (rep * 10 + p + 1) * MS + 1, 1, 100 + p)
        if k == 1:
            s.reset_all(base + 50 * MS, REAPER)
        s.reset_all(base + 90 * MS, SYNC)
    return s


def test_syncs_pages_and_collected_by_construction():
    (m,) = find_migrations(build().events())
    assert (m.pid, m.vm, m.tid, m.vcpu_tids, m.reaper_tids) == (PID, VM, SYNC, list(VCPUS),
                                                                [REAPER])
    assert [it.number for it in m.iterations] == [1, 2, 3]
    assert [it.ts for it in m.iterations] == [90 * MS + 1, 190 * MS + 1, 290 * MS + 1]
    assert [it.pages for it in m.iterations] == [20, 20, 20]
    assert [[r.pages for r in it.rings] for it in m.iterations] == [[10, 10]] * 3
    assert [it.harvested for it in m.iterations] == [40, 40, 40]
    # window 2: every push (+1..+20 ms) precedes the reaper's reset at +50 ms, which
    # collects them all; the sync at +90 ms finds nothing new
    assert [it.collected for it in m.iterations] == [40, 0, 40]
    assert [it.other_resets for it in m.iterations] == [
        {"vcpu": 0, "reaper": 0}, {"vcpu": 0, "reaper": 1}, {"vcpu": 0, "reaper": 0}]
    assert [it.sent_pages for it in m.iterations] == [None, None, 20]
    assert m.iterations[2].converging is False and m.stopped


def test_reset_calls_split_by_reset_lat():
    ev = build().events()
    resets = ev[(ev["kind"] == Kind.RESET) & (ev["tid"] == SYNC)]
    lats = ev[(ev["kind"] == Kind.RESET_LAT) & (ev["tid"] == SYNC)]
    assert [len(c) for c in reset_calls(resets, lats)] == [2, 2, 2]
    assert [len(c) for c in reset_calls(resets)] == [2, 2, 2]


def test_stall_split_at_the_own_reset():
    s = Stream()
    s.push(1 * MS, 0, 1)
    s.reset_all(2 * MS, VCPUS[0], dur=100_000)  # the vCPU's reset ends at 2.1 ms
    s.stall(7 * MS + 100_000, 6 * MS, 0)  # 1.1 .. 7.1 ms: 1 ms harvest, 5 ms asleep
    s.stall(20 * MS, 1 * MS, 0)  # no reset of its own: unsplit
    (sp,) = stall_splits(s.events())
    assert (sp.stalls, sp.stall_ns, sp.harvest_ns, sp.after_reset_ns) == (
        2, 7 * MS, 1 * MS, 5 * MS)
    assert sp.tails_ns == (5 * MS,)
    assert (sp.unsplit, sp.unsplit_ns, sp.throttled) == (1, 1 * MS, 1)
