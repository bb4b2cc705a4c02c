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
from dataclasses import dataclass, field

import numpy as np

from ..model.results import RingId

__all__ = ["WorkingSet", "RingWs", "HotPage"]


def _grow(arr: np.ndarray, need: int, limit: int) -> np.ndarray:
    if need <= len(arr):
        return arr
    size = min(limit, 1 << max(need - 1, 1).bit_length())
    out = np.zeros(size, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out


@dataclass
class RingWs:
    """Per ring: windows closed so far as (window index, pushes, distinct pages)."""

    windows: list[tuple[int, int, int]] = field(default_factory=list)
    pushes: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    cur: int = -1
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
        self.stamps: dict[tuple[int, int, int], np.ndarray] = {}
        self.count_overflow: Counter[tuple[int, int, int, int]] = Counter()

    def add(self, key: RingId, ts: np.ndarray, slot: np.ndarray, off: np.ndarray) -> None:
        if not len(ts):
            return
        if self.t0 is None:
            self.t0 = int(ts[0])
        rw = self.rings.get(key)
        if rw is None:
            rw = self.rings[key] = RingWs()
        if rw.first_ns is None:
            rw.first_ns = int(ts[0])
        rw.last_ns = int(ts[-1])
        rw.pushes += len(ts)
        w = (ts.astype(np.int64) - self.t0) // self.window_ns
        cuts = np.flatnonzero(w[1:] != w[:-1]) + 1 if w[0] != w[-1] else np.zeros(0, int)
        bounds = [0, *cuts.tolist(), len(ts)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            wi = int(w[a])
            if wi != rw.cur:
                self._close(rw)
                rw.cur = wi
            rw.cur_pushes += b - a
            self._mark(rw, slot[a:b], off[a:b])
        self._count(key, slot, off)

    def _by_slot(self, slot: np.ndarray) -> list[tuple[int, np.ndarray | slice]]:
        s0 = int(slot[0])
        if (slot == s0).all():
            return [(s0, slice(None))]
        return [(int(s), np.flatnonzero(slot == s)) for s in np.unique(slot)]

    def _mark(self, rw: RingWs, slot: np.ndarray, off: np.ndarray) -> None:
        for s, sel in self._by_slot(slot):
            o = off[sel]
            big = o >= self.max_pages
            if big.any():
                rw.overflow.update((s, int(x)) for x in o[big])
                o = o[~big]
                if not len(o):
                    continue
            o = o.astype(np.intp)
            lo, hi = int(o.min()), int(o.max()) + 1
            bm = rw.bitmaps[s] = _grow(rw.bitmaps.get(s, np.zeros(0, bool)), hi, self.max_pages)
            bm[o] = True
            t = rw.touched.get(s)
            rw.touched[s] = (lo, hi) if t is None else (min(t[0], lo), max(t[1], hi))

    def _close(self, rw: RingWs) -> None:
        if rw.cur < 0:
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

    def _count(self, key: RingId, slot: np.ndarray, off: np.ndarray) -> None:
        pid, vm = key[0], key[1]
        for s, sel in self._by_slot(slot):
            o = off[sel]
            big = o >= self.max_pages
            if big.any():
                self.count_overflow.update((pid, vm, s, int(x)) for x in o[big])
                o = o[~big]
                if not len(o):
                    continue
            o = o.astype(np.intp)
            ck = (pid, vm, s)
            need = int(o.max()) + 1
            cnt = self.counts[ck] = _grow(self.counts.get(ck, np.zeros(0, np.uint32)), need,
                                          self.max_pages)
            st = self.stamps[ck] = _grow(self.stamps.get(ck, np.zeros(0, np.uint32)), need,
                                         self.max_pages)
            ar = np.arange(len(o), dtype=np.uint32)
            st[o] = ar
            win = st[o] == ar
            cnt[o] += np.uint32(1)  # once per distinct page (buffered fancy add)
            if not win.all():
                np.add.at(cnt, o[~win], np.uint32(1))

    def finish(self) -> None:
        for rw in self.rings.values():
            self._close(rw)
            rw.cur = -1

    def hottest(self, top: int = 10) -> dict[tuple[int, int], list[HotPage]]:
        """Per VM (pid, vm): the ``top`` pages by pushes (ties: lower slot, offset first)."""
        out: dict[tuple[int, int], list[HotPage]] = {}
        for (pid, vm, s), cnt in self.counts.items():
            nz = np.flatnonzero(cnt)
            if len(nz) > top:
                kth = np.partition(cnt[nz], len(nz) - top)[len(nz) - top]
                nz = nz[cnt[nz] >= kth]
            out.setdefault((pid, vm), []).extend(HotPage(s, int(o), int(cnt[o])) for o in nz)
        for (pid, vm, s, o), n in self.count_overflow.items():
            out.setdefault((pid, vm), []).append(HotPage(s, o, n))
        for k, pages in out.items():
            pages.sort(key=lambda p: (-p.pushes, p.slot, p.offset))
            out[k] = pages[:top]
        return out
