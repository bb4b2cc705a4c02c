"""One ring of the fast replay: the reference semantics of :mod:`kvmtrace.testing.reference`
on numpy storage, one event or one run of pushes at a time.

This is the replay's careful path, taken around irregular events (gaps, indices going
back, overflow, a reset past dirty_index). Clean stretches go through :mod:`.bulk`
instead, which computes them vectorised and applies them through this class's methods:
the state changes only here. State is bounded: ``cap`` entries of (slot u32, offset u64,
live bool: the kernel's flags are set, push number i64), where ``cap`` is the ring size in
entries or, while the size is unknown, KVM_DIRTY_RING_MAX_ENTRIES (harvests stay exact: an
index maps to a distinct position within any 65536 consecutive indices). Soft-limit
episodes and pending resets are :class:`~kvmtrace.model.results.SoftEpisode` and
:class:`~kvmtrace.model.results.PendingReset`, as in the reference.
"""

from __future__ import annotations

import numpy as np

from ...core.kvm_abi import KVM_DIRTY_RING_MAX_ENTRIES, U32_MASK, UNKNOWN_SLOT, s32, u32
from ...model.digest import MultisetDigest
from ...model.results import (
    LIST_CAP,
    Anomaly,
    AnomalyKind,
    PendingReset,
    RingId,
    RingResult,
    SoftEpisode,
)
from .lostpages import LostPages

__all__ = ["FastRing"]

A = AnomalyKind


class FastRing:
    """Replay state of one ``struct kvm_dirty_ring`` (indices are the kernel's u32)."""

    def __init__(self, key: RingId, size: int | None, source: str, reserved: int,
                 keep_harvest: bool = False, eintr: bool = True) -> None:
        self.key = key
        self.eintr = eintr  # resets can stop part-way with no event (Linux 6.16+)
        self.nseq = 0  # pushes the model made (its entries' seq)
        self.lost = LostPages()
        self.reserved = reserved
        self.keep = keep_harvest
        self.res = RingResult(ring=key, size=size, size_source=source)
        self.started = False
        self.dirty = 0
        self.reset = 0
        self._alloc(self.cap)
        self.digest = MultisetDigest()
        self.harvest_parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.anomalies: list[Anomaly] = []
        self.overflow: Anomaly | None = None
        self.soft: SoftEpisode | None = None
        self.last_exit_reset: int | None = None
        self.livelock: Anomaly | None = None
        self.exit_ts: int | None = None
        self.unconfirmed: PendingReset | None = None
        self.irregular = False  # live flags may differ from the [reset, dirty) window

    # -- storage ----------------------------------------------------------------------
    @property
    def cap(self) -> int:
        return self.res.size or KVM_DIRTY_RING_MAX_ENTRIES

    def _alloc(self, cap: int) -> None:
        self.slot = np.full(cap, UNKNOWN_SLOT, dtype=np.uint32)
        self.off = np.zeros(cap, dtype=np.uint64)
        self.live = np.zeros(cap, dtype=bool)
        self.seq = np.full(cap, -1, dtype=np.int64)

    def spans(self, start: int, n: int) -> list[tuple[int, int]]:
        """Array slices holding the ``n`` (<= cap) entries from free-running ``start``."""
        cap = self.cap
        p = start & (cap - 1)
        if p + n <= cap:
            return [(p, p + n)]
        return [(p, cap), (0, p + n - cap)]

    def take(self, arr: np.ndarray, start: int, n: int) -> np.ndarray:
        parts = [arr[a:b] for a, b in self.spans(start, n)]
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def put(self, arr: np.ndarray, start: int, values: np.ndarray | bool | int) -> None:
        k = 0
        n = len(values) if isinstance(values, np.ndarray) else None
        for a, b in self.spans(start, n if n is not None else 0):
            arr[a:b] = values[k:k + b - a] if n is not None else values
            k += b - a

    def fill(self, arr: np.ndarray, start: int, n: int, value: bool | int) -> None:
        for a, b in self.spans(start, n):
            arr[a:b] = value

    def used(self) -> int:
        return s32(self.dirty - self.reset)

    def anomaly(self, kind: AnomalyKind, ts: int, di: int, ri: int, count: int,
                **extra: object) -> Anomaly:
        a = Anomaly(kind, self.key, int(ts), int(di), int(ri), int(count), extra=dict(extra))
        self.anomalies.append(a)
        return a

    def seen(self, first: int, last: int) -> None:
        if self.res.first_ns is None:
            self.res.first_ns = int(first)
        self.res.last_ns = int(last)

    def indices(self, di: int, ri: int, max_used: int) -> None:
        self.res.dirty_index, self.res.reset_index = int(di), int(ri)
        self.res.max_used = max(self.res.max_used, int(max_used))

    # -- start, pushes ------------------------------------------------------------------
    def start(self, dirty: int, reset: int) -> None:
        self.started = True
        self.dirty, self.reset = dirty, reset
        n = min(max(s32(dirty - reset), 0), self.cap)
        self.fill(self.live, dirty - n, n, True)
        self.soft_check()

    def clean_run(self, ts: np.ndarray, slot: np.ndarray, off: np.ndarray,
                  real: bool = True) -> None:
        """Pushes at dirty_index+1, +2, ... with reset_index unchanged (the caller checked)."""
        n = len(slot)
        cap = self.cap
        used0 = self.used()
        first_dirty = self.dirty
        for c0 in range(0, n, cap):
            k = min(n, c0 + cap) - c0
            lost = self.take(self.live, self.dirty, k)
            if lost.any():
                self._overwrite(ts, c0, lost, used0)
            self.put(self.slot, self.dirty, slot[c0:c0 + k])
            self.put(self.off, self.dirty, off[c0:c0 + k])
            self.put(self.seq, self.dirty, np.arange(self.nseq, self.nseq + k, dtype=np.int64))
            self.nseq += k
            self.fill(self.live, self.dirty, k, True)
            self.dirty = u32(self.dirty + k)
        if self.res.size is not None:
            self._soft_run(ts, n, used0, first_dirty)
        if real:
            self.res.pushes += n
            if self.exit_ts is not None:
                self.push_after_exit(int(ts[0]))

    def _overwrite(self, ts: np.ndarray, c0: int, lost: np.ndarray, used0: int) -> None:
        where = np.flatnonzero(lost)
        cnt = len(where)
        self.res.overwritten += cnt
        self.irregular = True  # later resets collect what the kernel flags, not indices
        if self.overflow is None:
            j = int(where[0])
            self.overflow = self.anomaly(A.OVERFLOW, ts[c0 + j], u32(self.dirty + j + 1),
                                         self.reset, 0, size=self.cap,
                                         max_used=used0 + c0 + j + 1)
        ov = self.overflow
        ov.count += cnt
        ov.extra["max_used"] = max(ov.extra["max_used"], used0 + c0 + int(where[-1]) + 1)
        s = self.take(self.slot, self.dirty, len(lost))[where]
        o = self.take(self.off, self.dirty, len(lost))[where]
        self.lost.lost(s, o, self.take(self.seq, self.dirty, len(lost))[where])
        room = LIST_CAP - len(ov.entries)
        if room > 0:
            ov.entries.extend(zip(s[:room].tolist(), o[:room].tolist(), strict=True))

    def _soft_run(self, ts: np.ndarray, n: int, used0: int, first_dirty: int) -> None:
        limit = self.res.size - self.reserved  # type: ignore[operator]
        if self.soft is None:
            k_open = max(0, limit - used0 - 1)
            if k_open >= n:
                return
            self.soft = SoftEpisode(max_used=used0 + k_open + 1)
        ep = self.soft
        ep.max_used = max(ep.max_used, used0 + n)
        if not ep.exited:
            k_past = max(0, limit - used0)
            if k_past < n:
                ep.add(past=n - k_past,
                       first=(int(ts[k_past]), u32(first_dirty + k_past + 1), self.reset))

    def fill_gap(self, ts: int, n: int) -> None:
        fill = min(n, self.cap)
        self.dirty = u32(self.dirty + n - fill)
        self.clean_run(np.full(fill, ts, dtype=np.uint64),
                       np.full(fill, UNKNOWN_SLOT, dtype=np.uint32),
                       np.zeros(fill, dtype=np.uint64), real=False)

    def sync_dirty(self, ts: int, dirty: int, ri: int, event: str) -> None:
        d = s32(dirty - self.dirty)
        step = 1 if event == "push" else 0
        if d > 0:
            got = u32(dirty + step)
            self.anomaly(A.GAP, ts, got, ri, d, index="dirty_index",
                         expected=u32(self.dirty + step), got=got, event=event)
            self.res.lost_pushes += d
            self.fill_gap(ts, d)
        elif d < 0:
            after = u32(dirty + step)
            self.anomaly(A.BACKWARDS, ts, after, ri, -d, index="dirty_index",
                         before=self.dirty, after=after, event=event)
            self.dirty = dirty
            self.irregular = True

    def push_one(self, ts: int, di: int, ri: int, slot: int, off: int) -> None:
        if not self.started:
            self.start(u32(di - 1), ri)
        self.sync_dirty(ts, u32(di - 1), ri, "push")
        # reset_index read after the entry was written: a walk past it ran after the write
        late = s32(ri - (di - 1)) > 0
        if late and s32(u32(di - 1) - self.reset) > 0:
            self.sync_reset(ts, u32(di - 1), "push")
        if not late:
            self.sync_reset(ts, ri, "push")
        self.clean_run(np.array([ts], dtype=np.uint64), np.array([slot], dtype=np.uint32),
                       np.array([off], dtype=np.uint64))
        if late:
            self.sync_reset(ts, ri, "push")
        self.seen(ts, ts)
        self.indices(di, ri, s32(di - ri))

    def push_run(self, ts: np.ndarray, di: np.ndarray, ri: np.ndarray, slot: np.ndarray,
                 off: np.ndarray) -> None:
        """Consecutive pushes of this ring (no other event of the ring in between)."""
        n, i = len(di), 0
        while i < n:
            if self.started:
                exp = (np.arange(self.dirty + 1, self.dirty + 1 + n - i, dtype=np.int64)
                       & U32_MASK)
                bad = (di[i:] != exp) | (ri[i:] != self.reset)
                j = int(np.argmax(bad)) if bad.any() else n - i
                if j:
                    e = i + j
                    self.clean_run(ts[i:e], slot[i:e], off[i:e])
                    self.seen(ts[i], ts[e - 1])
                    self.indices(di[e - 1], ri[e - 1], s32(int(di[e - 1]) - int(ri[e - 1])))
                    i = e
                    if i == n:
                        return
            self.push_one(int(ts[i]), int(di[i]), int(ri[i]), int(slot[i]), int(off[i]))
            i += 1

    # -- resets ---------------------------------------------------------------------
    def on_reset(self, ts: int, di: int, ri: int) -> None:
        self.seen(ts, ts)
        self.res.resets += 1
        if not self.started:
            self.start(di, ri)
        else:
            self.sync_dirty(ts, di, ri, "reset")
            if self.unconfirmed is not None and s32(ri - self.unconfirmed.to) >= 0:
                self.unconfirmed = None
            self.sync_reset(ts, ri, "reset")
        self.indices(di, ri, s32(di - ri))

    def sync_reset(self, ts: int, ri: int, event: str) -> None:
        d = s32(ri - self.reset)
        if d < 0:
            self.anomaly(A.BACKWARDS, ts, self.dirty, ri, -d, index="reset_index",
                         before=self.reset, after=ri, event=event)
            self.reset = ri
            self.irregular = True
        elif d > 0:
            beyond = s32(ri - self.dirty)
            if beyond > 0:
                self.anomaly(A.RESET_BEYOND, ts, self.dirty, ri, beyond)
                self.irregular = True
            if event == "push" and self.unconfirmed is None:
                self.unconfirmed = PendingReset(ts, self.dirty, self.reset, ri)
            elif event == "push":
                self.unconfirmed.to = ri
            skip = d - min(d, self.cap)
            self.res.harvested_unknown += skip
            self.collect(u32(self.reset + skip), d - skip)
            self.reset = ri
            self.res.entries_reset += d
            self.livelock = None
        else:
            return
        if self.overflow is not None and self.used() <= self.cap:
            self.overflow = None
        self.soft_check()

    def collect(self, start: int, n: int) -> None:
        """The entries a reset collected (kernel reset walk over ``n`` marked entries)."""
        s = self.take(self.slot, start, n)
        o = self.take(self.off, start, n)
        self.fill(self.live, start, n, False)
        if self.lost:
            self.lost.collected(s, o, self.take(self.seq, start, n))
        self.add_harvest(s, o)

    def add_harvest(self, s: np.ndarray, o: np.ndarray) -> None:
        if s.strides == (0,) and len(s):  # one slot (a broadcast view): no pass over it
            nk = 0 if int(s[0]) == UNKNOWN_SLOT else len(s)
            known = None
        else:
            known = s != UNKNOWN_SLOT
            nk = int(np.count_nonzero(known))
        self.res.harvested_unknown += len(s) - nk
        if nk != len(s):
            s, o = (s[:0], o[:0]) if known is None else (s[known], o[known])
        self.res.harvested += nk
        self.digest.add_np(s, o)
        if self.keep and nk:
            self.harvest_parts.append((s.copy(), o.copy()))

    # -- soft limit, exits, size ------------------------------------------------------
    def soft_check(self) -> None:
        size = self.res.size
        if size is None or not self.started:
            return
        used = self.used()
        if used >= size - self.reserved and self.soft is None:
            self.soft = SoftEpisode(max_used=used)
        elif used < size - self.reserved and self.soft is not None:
            self.close_soft()

    def close_soft(self) -> None:
        ep, self.soft = self.soft, None
        # pushes past the soft limit are the kernel's rule until the vCPU's next guest
        # entry, which no event shows (a reset before it drops the request): only a
        # vCPU that kept pushing into a full ring (used > size) without an exit is one
        if (ep is not None and not ep.exited and ep.past
                and ep.max_used > self.res.size):  # type: ignore[operator]
            assert ep.first is not None
            ts, di, ri = ep.first
            self.anomaly(A.NO_EXIT, ts, di, ri, ep.past,
                         soft_limit=self.res.size - self.reserved,  # type: ignore[operator]
                         max_used=ep.max_used)

    def on_exit(self, ts: int) -> None:
        self.seen(ts, ts)
        self.res.soft_full_exits += 1
        if self.soft is not None:
            self.soft.exited = True
        if self.started:
            self.exit_livelock(ts, self.dirty, self.reset)
        self.exit_ts = ts

    def exit_livelock(self, ts: int, dirty: int, reset: int) -> None:
        if self.last_exit_reset is not None and reset == self.last_exit_reset:
            if self.livelock is None:
                self.livelock = self.anomaly(A.LIVELOCK, ts, dirty, reset, 1,
                                             used=s32(dirty - reset))
            self.livelock.count += 1
        self.last_exit_reset = reset

    def set_size(self, size: int, source: str, ts: int) -> None:
        started = self.started
        old_cap = self.cap
        keep = min(size, old_cap)
        if started:
            s = self.take(self.slot, self.dirty - keep, keep)
            o = self.take(self.off, self.dirty - keep, keep)
            lv = self.take(self.live, self.dirty - keep, keep)
            sq = self.take(self.seq, self.dirty - keep, keep)
            lost_n = min(max(s32(self.dirty - size - self.reset), 0), old_cap)
            ls = self.take(self.slot, self.reset, lost_n)
            lo = self.take(self.off, self.reset, lost_n)
            ll = self.take(self.live, self.reset, lost_n)
            lq = self.take(self.seq, self.reset, lost_n)
        self.res.size, self.res.size_source = size, source
        self._alloc(size)
        if not started:
            return
        self.put(self.slot, self.dirty - keep, s)
        self.put(self.off, self.dirty - keep, o)
        self.put(self.live, self.dirty - keep, lv)
        self.put(self.seq, self.dirty - keep, sq)
        if ll.any():
            self.lost.lost(ls[ll], lo[ll], lq[ll])
            self.irregular = True
            self.res.overwritten += int(ll.sum())
            if self.overflow is None:
                self.overflow = self.anomaly(A.OVERFLOW, ts, self.dirty, self.reset, 0,
                                             size=size, max_used=self.used())
            self.overflow.count += int(ll.sum())
            room = LIST_CAP - len(self.overflow.entries)
            self.overflow.entries.extend(
                zip(ls[ll][:room].tolist(), lo[ll][:room].tolist(), strict=True))
        self.soft_check()

    def stuck(self) -> bool:
        """reset_index on an entry whose flags a reset cleared while entries are pushed:
        the walk stops there at once and the VMM's harvest, which follows the same index,
        finds nothing (kvm_dirty_ring_reset, kvm_dirty_ring_push)."""
        return (self.started and 0 < self.used()
                and not self.live[self.reset & (self.cap - 1)])

    def finish(self) -> None:
        self.close_soft()
        if self.stuck():
            n = int(np.count_nonzero(self.live))
            where = np.flatnonzero(self.live)
            self.lost.lost(self.slot[where], self.off[where], self.seq[where])
            self.res.stranded, self.res.stuck = n, True
            self.anomaly(A.STUCK, self.res.last_ns or 0, self.dirty, self.reset, n,
                         used=self.used())
        self.res.lost_pages, self.res.lost_page_count = self.lost.result(LIST_CAP)
        p = self.unconfirmed
        if p is not None and not self.eintr:
            self.anomaly(A.GAP, p.ts, p.dirty_index, p.to, 1, index="reset_index",
                         expected=p.start, got=p.to, event="push")
        self.res.harvest_sum1, self.res.harvest_sum2 = self.digest.sum1, self.digest.sum2

    def harvested(self) -> list[tuple[int, int]]:
        """All harvested (slot, offset) in the order resets collected them, i.e. ring
        order, as a VMM harvests (only with keep_harvest; entries of unknown content
        are left out)."""
        if not self.harvest_parts:
            return []
        s = np.concatenate([p[0] for p in self.harvest_parts])
        o = np.concatenate([p[1] for p in self.harvest_parts])
        return list(zip(s.tolist(), o.tolist(), strict=True))

    # -- a clean stretch at once (:mod:`.bulk`, :mod:`.exits`) -------------------------
    def window_regular(self) -> bool:
        """Whether the live flags are exactly the ``[reset_index, dirty_index)`` window
        (after an irregular event they may not be); once they are, the ring is regular
        again."""
        if not self.irregular:
            return True
        n = min(max(self.used(), 0), self.cap)
        expect = np.zeros(self.cap, dtype=bool)
        self.fill(expect, self.reset, n, True)
        if n != self.used() or not np.array_equal(expect, self.live):
            return False
        self.irregular = False
        return True

    def on_stall(self, ns: int) -> None:
        """A KT_STALL event: the vCPU waited ``ns`` for a soft-full ring to drain."""
        self.res.stalls.add(ns)

    def count_clean(self, pushes: int, resets: int, exits: int, stalls: np.ndarray) -> None:
        """The events of a clean stretch, counted (``stalls``: their durations, ns)."""
        self.res.pushes += pushes
        self.res.resets += resets
        self.res.soft_full_exits += exits
        if len(stalls):
            self.res.stalls.add_many(stalls)

    def confirm_resets(self, reset_indices: np.ndarray) -> None:
        """Reset events with these reset_index values (u32): one at or past a pending
        reset's end confirms it."""
        p = self.unconfirmed
        if p is not None and len(reset_indices) and (
                (reset_indices - np.uint32(p.to)).astype(np.uint32, copy=False).view(np.int32)
                >= 0).any():
            self.unconfirmed = None

    def collect_new(self, s: np.ndarray, o: np.ndarray) -> None:
        """Entries pushed and collected by a reset within one stretch (slot, offset in
        push order; the first pushes the model has not stored yet)."""
        if self.lost:
            self.lost.collected(s, o, np.arange(self.nseq, self.nseq + len(s)))
        self.add_harvest(s, o)

    def reset_progress(self, entries: int, exits: bool) -> None:
        """reset_index moved ``entries`` forward over a stretch; ``exits``: soft-full exits
        among its events (:func:`~.exits.exits` then decides the livelock)."""
        self.res.entries_reset += entries
        if not exits:
            self.livelock = None

    def store_pushes(self, end: int, s: np.ndarray, o: np.ndarray, n: int) -> None:
        """The last ``len(s)`` of ``n`` consecutive pushes whose last one made
        dirty_index ``end``: their slot and offset into the ring's entries."""
        k = len(s)
        start = (end - k) & U32_MASK
        self.put(self.slot, start, s)
        self.put(self.off, start, o)
        self.put(self.seq, start, np.arange(self.nseq + n - k, self.nseq + n, dtype=np.int64))
        self.nseq += n

    def move_window(self, dirty: int, reset: int, used_before: int) -> None:
        """The indices after a clean stretch; the live flags follow the new window."""
        self.fill(self.live, self.reset, max(0, used_before), False)
        self.fill(self.live, reset, max(0, s32(dirty - reset)), True)
        self.dirty, self.reset = dirty, reset

    def push_after_exit(self, ts: int) -> None:
        """The first push after a soft-full exit, at ``ts`` (ns)."""
        assert self.exit_ts is not None
        self.res.exit_to_push.add(ts - self.exit_ts)
        self.exit_ts = None

    def exit_to_push_many(self, ns: np.ndarray) -> None:
        """Exit -> next push durations (ns) of exits within one stretch."""
        self.res.exit_to_push.add_many(ns)

    def end_livelock(self) -> None:
        """Reset progress: a livelock episode, if any, is over."""
        self.livelock = None

    def after_exits(self, last_reset: int | None, waiting_since: int | None) -> None:
        """State after a stretch's soft-full exits: reset_index at the last one (None: kept
        as is) and, when no push followed it, its time (ns)."""
        if last_reset is not None:
            self.last_exit_reset = last_reset
        self.exit_ts = waiting_since

    def open_soft(self, ep: SoftEpisode) -> None:
        """A soft-limit episode starts (none is open)."""
        assert self.soft is None
        self.soft = ep
