"""Dirty rate, working set per vCPU and the hottest pages, from push events.

- working set of a ring (vCPU) in a window: distinct (slot, offset) it pushed in that
  window (windows of ``window_ns`` from the first event); kept as one bool bitmap per
  (ring, slot) reused for every window, so memory is bounded by the pages touched.
- dirty rate: pushes per second over the ring's active span, and the busiest window's.
- hottest pages: per VM, the (slot, offset) pushed most often over the whole trace (a page
  pushed again was re-dirtied after its entry was harvested and reset).

Pages at offsets beyond ``max_pages`` per slot fall back to Python sets/dicts (slow but
exact); typical guests stay far below the default 2**24 pages (64 GiB per slot).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ...model.results import RingId

__all__ = ["WorkingSet", "RingWs", "HotPage", "PushTimes"]


#: u64 offsets may be read as intp without a copy (64-bit intp, native order)
_U64_AS_INTP = np.dtype(np.uint64) if np.dtype(np.intp).itemsize == 8 else None


def _grow(arr: np.ndarray, need: int, limit: int) -> np.ndarray:
    if need <= len(arr):
        return arr
    size = min(limit, 1 << max(need - 1, 1).bit_length())
    out = np.zeros(size, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out


def _kth_largest(v: np.ndarray, k: int) -> int:
    """The k-th largest of ``v`` (push counts, 1 <= k <= len(v)). Counts are small and
    often equal, where np.partition degrades: a histogram of them when it is small."""
    mx = int(v.max())
    if mx > 4 * len(v) + 4096:
        return int(np.partition(v, len(v) - k)[len(v) - k])
    at_least = np.cumsum(np.bincount(v, minlength=mx + 1)[::-1])[::-1]  # [c]: # >= c
    return int(np.flatnonzero(at_least >= k)[-1])


@dataclass(frozen=True)
class PushTimes:
    """Sorted push timestamps (ns) known by their count and ends; ``make()`` builds the
    array, which :meth:`WorkingSet.add` only needs when the pushes span windows."""

    n: int
    first: int
    last: int
    make: Callable[[], np.ndarray]

    @staticmethod
    def of(ts: np.ndarray) -> PushTimes:
        n = len(ts)
        return PushTimes(n, int(ts[0]) if n else 0, int(ts[-1]) if n else 0, lambda: ts)


@dataclass
class RingWs:
    """Per ring: windows closed so far as (window index, pushes, distinct pages)."""

    windows: list[tuple[int, int, int]] = field(default_factory=list)
    pushes: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    cur: int | None = None  #: window being filled (index from WorkingSet.t0; may be < 0)
    cur_pushes: int = 0
    bitmaps: dict[int, np.ndarray] = field(default_factory=dict)
    touched: dict[int, tuple[int, int]] = field(default_factory=dict)
    overflow: set[tuple[int, int]] = field(default_factory=set)

    def rate(self) -> float | None:
        """Mean pushes per second over the ring's active span."""
        if self.first_ns is None or self.last_ns is None or self.last_ns <= self.first_ns:
            return None
        return self.pushes * 1e9 / (self.last_ns - self.first_ns)


@dataclass(frozen=True)
class HotPage:
    slot: int
    offset: int
    pushes: int


class WorkingSet:
    """Feed pushes per ring (time order) with :meth:`add`, then read :meth:`finish`."""

    def __init__(self, window_ns: int = 1_000_000_000, *, max_pages: int = 1 << 24) -> None:
        self.window_ns = max(1, int(window_ns))
        self.max_pages = max_pages
        self.t0: int | None = None
        self.rings: dict[RingId, RingWs] = {}
        self.counts: dict[tuple[int, int, int], np.ndarray] = {}  # (pid, vm, slot)
        self.count_overflow: Counter[tuple[int, int, int, int]] = Counter()

    def ring(self, key: RingId) -> RingWs:
        """The ring's state (created empty the first time)."""
        rw = self.rings.get(key)
        if rw is None:
            rw = self.rings[key] = RingWs()
        return rw

    def merge(self, other: WorkingSet) -> None:
        """Take in the finished working set of a replay of other rings (same trace, same
        t0): its rings (kept in key order) and its push counts."""
        rings = {**self.rings, **other.rings}
        self.rings = {k: rings[k] for k in sorted(rings)}
        for ck, cnt in other.counts.items():
            mine = self.counts.get(ck)
            if mine is None:
                self.counts[ck] = cnt
                continue
            if len(cnt) > len(mine):
                mine, cnt = cnt, mine
            mine[: len(cnt)] += cnt
            self.counts[ck] = mine
        self.count_overflow.update(other.count_overflow)

    def strip(self) -> None:
        """Drop the per-window scratch (bitmaps) of finished rings: what a merge needs."""
        for rw in self.rings.values():
            rw.bitmaps.clear()
            rw.touched.clear()
            rw.overflow.clear()

    def add(self, key: RingId, ts: np.ndarray | PushTimes, slot: np.ndarray,
            off: np.ndarray) -> None:
        """Pushes of ring ``key`` in time order: ts (ns), slot (u32), offset (page)."""
        pt = ts if isinstance(ts, PushTimes) else PushTimes.of(ts)
        n = pt.n
        if not n:
            return
        if self.t0 is None:
            self.t0 = pt.first
        rw = self.ring(key)
        if rw.first_ns is None:
            rw.first_ns = pt.first
        rw.last_ns = pt.last
        rw.pushes += n
        wins, bounds = self._occupied(pt)
        parts = []  # per slot: slot, its offsets (intp), window cuts into them, range
        for s, sel in self._by_slot(slot):
            o = off if sel is None else off[sel]
            cuts = bounds if sel is None else np.searchsorted(sel, bounds).tolist()
            lo, hi = int(o.min()), int(o.max()) + 1
            if hi > self.max_pages:
                big = o >= self.max_pages
                self._big_count(key, s, o[big])
                small = o[~big]
                if len(small):
                    small = small.astype(np.intp)
                    self._count(key, s, small, int(small.max()) + 1)
                parts.append((s, o, cuts, True, None))
                continue
            # all below max_pages: a u64 column read as intp is the same numbers (no copy)
            o = o.view(np.intp) if o.dtype == _U64_AS_INTP else o.astype(np.intp)
            self._count(key, s, o, hi)
            parts.append((s, o, cuts, False, (lo, hi) if len(wins) == 1 else None))
        for k, wi in enumerate(wins):
            a, b = bounds[k], bounds[k + 1]
            if a == b:
                continue
            self._window(rw, wi)
            rw.cur_pushes += b - a
            for s, o, cuts, has_big, span in parts:
                seg = o[cuts[k]:cuts[k + 1]]
                if not len(seg):
                    continue
                if has_big:
                    big = seg >= self.max_pages
                    rw.overflow.update((s, int(x)) for x in seg[big])
                    seg = seg[~big].astype(np.intp)
                    if not len(seg):
                        continue
                self._mark(rw, s, seg, span)

    def _occupied(self, pt: PushTimes) -> tuple[list[int], list[int]]:
        """The windows the pushes fall in (index from t0) and the pushes' cuts between
        them: at most one window per push, whatever the time between them (a trace whose
        clock jumps by 1e8 s costs what its events cost, not 1e8 windows)."""
        assert self.t0 is not None
        t0, wns, n = self.t0, self.window_ns, pt.n
        w0 = (pt.first - t0) // wns
        w1 = (pt.last - t0) // wns
        if w1 == w0:
            return [w0], [0, n]
        ts = pt.make()
        top = int(np.iinfo(np.uint64).max)
        if w1 - w0 < n:  # dense: every window edge by one binary search
            wins = list(range(w0, w1 + 1))
            edges = np.array([min(top, max(0, t0 + w * wns)) for w in wins[1:]],
                             dtype=np.uint64)
            return wins, [0, *np.searchsorted(ts, edges).tolist(), n]
        wins, bounds, i = [], [0], 0  # sparse: jump from push to push
        while i < n:
            w = (int(ts[i]) - t0) // wns
            edge = t0 + (w + 1) * wns
            i = n if edge > top else int(np.searchsorted(ts, np.uint64(max(0, edge))))
            wins.append(w)
            bounds.append(i)
        return wins, bounds

    def _window(self, rw: RingWs, wi: int) -> None:
        if wi != rw.cur:
            self._close(rw)
            rw.cur = wi

    @staticmethod
    def _by_slot(slot: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
        s0 = int(slot[0])
        if slot.strides == (0,) or (int(slot[-1]) == s0 and (slot == s0).all()):
            return [(s0, None)]  # (a broadcast view holds one value)
        return [(int(s), np.flatnonzero(slot == s)) for s in np.unique(slot)]

    def _big_count(self, key: RingId, s: int, o: np.ndarray) -> None:
        """Push counts of pages beyond max_pages (a Counter: slow, exact)."""
        self.count_overflow.update((key[0], key[1], s, int(x)) for x in o)

    def _mark(self, rw: RingWs, s: int, o: np.ndarray,
              span: tuple[int, int] | None = None) -> None:
        lo, hi = (int(o.min()), int(o.max()) + 1) if span is None else span
        bm = rw.bitmaps.get(s)
        if bm is None or hi > len(bm):
            bm = rw.bitmaps[s] = _grow(np.zeros(0, bool) if bm is None else bm, hi,
                                       self.max_pages)
        bm[o] = True
        t = rw.touched.get(s)
        rw.touched[s] = (lo, hi) if t is None else (min(t[0], lo), max(t[1], hi))

    def _close(self, rw: RingWs) -> None:
        if rw.cur is None:
            return
        uniq = len(rw.overflow)
        for s, (lo, hi) in rw.touched.items():
            bm = rw.bitmaps[s]
            uniq += int(np.count_nonzero(bm[lo:hi]))
            bm[lo:hi] = False
        rw.touched.clear()
        rw.overflow.clear()
        rw.windows.append((rw.cur, rw.cur_pushes, uniq))
        rw.cur_pushes = 0

    def _count(self, key: RingId, s: int, o: np.ndarray, need: int) -> None:
        """Count pushes of pages ``o`` (all < ``need``)."""
        ck = (key[0], key[1], s)
        cnt = self.counts.get(ck)
        if cnt is None or need > len(cnt):
            cnt = self.counts[ck] = _grow(np.zeros(0, np.uint32) if cnt is None else cnt,
                                          need, self.max_pages)
        np.add.at(cnt, o, np.uint32(1))  # unbuffered: repeated pages count each time

    def finish(self) -> None:
        for rw in self.rings.values():
            self._close(rw)
            rw.cur = None

    def hottest(self, top: int = 10) -> dict[tuple[int, int], list[HotPage]]:
        """Per VM (pid, vm): the ``top`` pages by pushes (ties: lower slot, offset first)."""
        out: dict[tuple[int, int], list[HotPage]] = {}
        for (pid, vm, s), cnt in sorted(self.counts.items()):
            nz = np.flatnonzero(cnt)
            if len(nz) > top:
                kth = _kth_largest(cnt[nz], top)
                above = nz[cnt[nz] > kth]
                ties = nz[cnt[nz] == kth][: top - len(above)]  # lowest offsets first
                nz = np.concatenate([above, ties])
            out.setdefault((pid, vm), []).extend(HotPage(s, int(o), int(cnt[o])) for o in nz)
        for (pid, vm, s, o), n in self.count_overflow.items():
            out.setdefault((pid, vm), []).append(HotPage(s, o, n))
        for k, pages in out.items():
            pages.sort(key=lambda p: (-p.pushes, p.slot, p.offset))
            out[k] = pages[:top]
        return out
