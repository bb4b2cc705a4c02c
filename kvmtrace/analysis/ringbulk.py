"""The replay's fast path: one ring's events of a batch, vectorised.

A stretch of a ring's events is *clean* when every push moves dirty_index by exactly one
with reset_index unchanged and leaves ``used <= size``, every reset event repeats
dirty_index and moves reset_index forward but not past it, no overflow episode is open and
the live flags equal the ``[reset_index, dirty_index)`` window. Then the reference
semantics reduce to index arithmetic: counters are sums, the harvested entries are those
of indices reset_start..reset_end (old ones from the ring arrays, new ones straight from
the batch's pushes), soft-limit episodes are runs of ``used >= soft_limit``. Only soft-full
exits (rare) are looked at one by one. Anything else goes to :class:`~.ringstate.FastRing`
event by event (pushes still in vectorised runs) up to the ring's next reset event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..source.events import Kind
from .ringstate import M32, FastRing

__all__ = ["Cols", "feed_ring"]

_PUSH, _RESET, _EXIT, _STALL = int(Kind.PUSH), int(Kind.RESET), int(Kind.EXIT), int(Kind.STALL)


@dataclass
class Cols:
    """One ring's events of a batch, in time order, as plain arrays."""

    ts: np.ndarray  # u64 ns
    kind: np.ndarray  # u8
    di: np.ndarray  # i64 (u32 values)
    ri: np.ndarray  # i64 (u32 values)
    slot: np.ndarray  # u32
    off: np.ndarray  # u64 (event value)

    def __len__(self) -> int:
        return len(self.kind)

    def take(self, sel: np.ndarray) -> Cols:
        """The events at indices ``sel``."""
        return Cols(self.ts[sel], self.kind[sel], self.di[sel], self.ri[sel], self.slot[sel],
                    self.off[sel])


def _s32(x: np.ndarray) -> np.ndarray:
    return ((x + 0x80000000) & M32) - 0x80000000


def feed_ring(ring: FastRing, c: Cols) -> None:
    """Process all of ``c`` (one ring, time order)."""
    n, i = len(c), 0
    while i < n:
        if not ring.started:
            ib = np.flatnonzero((c.kind[i:] == _PUSH) | (c.kind[i:] == _RESET))
            j = i + int(ib[0]) if len(ib) else n - 1
            _slow(ring, c, i, j + 1)
            i = j + 1
            continue
        k = _clean_prefix(ring, c, i)
        if k:
            _bulk(ring, c, i, i + k)
            i += k
        if i < n:
            resets = np.flatnonzero(c.kind[i:] == _RESET)
            j = i + int(resets[0]) if len(resets) else n - 1
            _slow(ring, c, i, j + 1)
            i = j + 1


def _slow(ring: FastRing, c: Cols, a: int, b: int) -> None:
    kind = c.kind
    i = a
    while i < b:
        k = int(kind[i])
        if k == _PUSH:
            rest = np.flatnonzero(kind[i:b] != _PUSH)
            e = i + int(rest[0]) if len(rest) else b
            ring.push_run(c.ts[i:e], c.di[i:e], c.ri[i:e], c.slot[i:e], c.off[i:e])
            i = e
            continue
        ts = int(c.ts[i])
        if k == _RESET:
            ring.on_reset(ts, int(c.di[i]), int(c.ri[i]))
        elif k == _EXIT:
            ring.on_exit(ts)
        elif k == _STALL:
            ring.res.stalls.add(int(c.off[i]))
        i += 1


def _clean_prefix(ring: FastRing, c: Cols, a: int) -> int:
    """How many events from ``a`` form a clean stretch (see the module docstring)."""
    if ring.overflow is not None:
        return 0
    if ring.irregular:
        n = min(max(ring.used(), 0), ring.cap)
        expect = np.zeros(ring.cap, dtype=bool)
        ring.fill(expect, ring.reset, n, True)
        if n != ring.used() or not np.array_equal(expect, ring.live):
            return 0
        ring.irregular = False
    kind = c.kind[a:]
    ibm = (kind == _PUSH) | (kind == _RESET)
    ib = np.flatnonzero(ibm)
    if not len(ib):
        return len(kind)
    di, ri = c.di[a:][ib], c.ri[a:][ib]
    push = kind[ib] == _PUSH
    pdi = np.empty_like(di)
    pri = np.empty_like(ri)
    pdi[0], pri[0] = ring.dirty, ring.reset
    pdi[1:], pri[1:] = di[:-1], ri[:-1]
    used = _s32(di - ri)
    step = _s32(ri - pri)
    ok_push = (di == ((pdi + 1) & M32)) & (ri == pri) & (used <= ring.cap)
    ok_reset = (di == pdi) & (step >= 0) & (used >= 0)
    ok = np.where(push, ok_push, ok_reset)
    if ok.all():
        return len(kind)
    return int(ib[int(np.argmin(ok))])


def _bulk(ring: FastRing, c: Cols, a: int, b: int) -> None:
    kind = c.kind[a:b]
    ts = c.ts[a:b]
    res = ring.res
    ibm = (kind == _PUSH) | (kind == _RESET)
    ppos = np.flatnonzero(kind == _PUSH)
    xpos = np.flatnonzero(kind == _EXIT)
    spos = np.flatnonzero(kind == _STALL)
    ib = np.flatnonzero(ibm)
    seenm = ibm | (kind == _EXIT)
    if seenm.any():
        sp = np.flatnonzero(seenm)
        ring.seen(ts[sp[0]], ts[sp[-1]])
    if len(spos):
        res.stalls.add_many(c.off[a:b][spos])
    d0, r0 = ring.dirty, ring.reset
    if len(ib):
        di, ri = c.di[a:b][ib], c.ri[a:b][ib]
        used = _s32(di - ri)
        ring.indices(di[-1], ri[-1], int(used.max()))
        d1, r1 = int(di[-1]), int(ri[-1])
    else:
        di = ri = used = np.zeros(0, dtype=np.int64)
        d1, r1 = d0, r0
    np_ = len(ppos)
    res.pushes += np_
    res.resets += len(ib) - np_
    res.soft_full_exits += len(xpos)
    if ring.unconfirmed is not None and len(ib) > np_:
        rr = ri[kind[ib] == _RESET]
        if (_s32(rr - ring.unconfirmed[3]) >= 0).any():
            ring.unconfirmed = None
    # harvest and storage
    adv = int(_s32(np.int64(r1 - r0)))
    if adv > 0:
        old_n = max(0, min(adv, int(_s32(np.int64(d0 - r0)))))
        if old_n:
            ring.collect(r0, old_n)
        new_n = adv - old_n
        if new_n:
            ring.add_harvest(c.slot[a:b][ppos[:new_n]], c.off[a:b][ppos[:new_n]])
        res.entries_reset += adv
        ring.livelock = None if not len(xpos) else ring.livelock
    if np_:
        k = min(np_, ring.cap)
        start = (d1 - k) & M32
        ring.put(ring.slot, start, c.slot[a:b][ppos[-k:]])
        ring.put(ring.off, start, c.off[a:b][ppos[-k:]])
        ring.fill(ring.live, r0, max(0, int(_s32(np.int64(d0 - r0)))), False)
        ring.fill(ring.live, r1, max(0, int(_s32(np.int64(d1 - r1)))), True)
    elif adv > 0:
        ring.fill(ring.live, r0, max(0, int(_s32(np.int64(d0 - r0)))), False)
        ring.fill(ring.live, r1, max(0, int(_s32(np.int64(d1 - r1)))), True)
    ring.dirty, ring.reset = d1, r1
    if len(xpos) or ring.exit_ts is not None:
        _exits(ring, ts, ppos, xpos, ib, di, ri, d0, r0, r1)
    if res.size is not None:
        _soft(ring, kind, ts, c.di[a:b], c.ri[a:b], ibm, used, int(_s32(np.int64(d0 - r0))))


def _exits(ring: FastRing, ts: np.ndarray, ppos: np.ndarray, xpos: np.ndarray,
           ib: np.ndarray, dis: np.ndarray, ris: np.ndarray, d0: int, r0: int,
           r1: int) -> None:
    """Soft-full exits: livelock episodes and exit -> next push times, in event order."""
    res = ring.res
    if ring.exit_ts is not None and len(ppos) and (not len(xpos) or ppos[0] < xpos[0]):
        res.exit_to_push.add(int(ts[ppos[0]]) - ring.exit_ts)
        ring.exit_ts = None
    if not len(xpos):
        return
    j = np.searchsorted(ib, xpos) - 1
    prev_reset = r0
    nxt = np.searchsorted(ppos, xpos)
    for q, x in enumerate(xpos.tolist()):
        dx, rx = (int(dis[j[q]]), int(ris[j[q]])) if j[q] >= 0 else (d0, r0)
        if rx != prev_reset:
            ring.livelock = None
        prev_reset = rx
        ring.exit_livelock(int(ts[x]), dx, rx)
        p = int(nxt[q])
        if p < len(ppos) and (q + 1 == len(xpos) or ppos[p] < xpos[q + 1]):
            res.exit_to_push.add(int(ts[ppos[p]]) - int(ts[x]))
    if r1 != prev_reset:
        ring.livelock = None
    ring.exit_ts = int(ts[xpos[-1]]) if nxt[-1] >= len(ppos) else None


def _soft(ring: FastRing, kind: np.ndarray, ts: np.ndarray, cdi: np.ndarray,
          cri: np.ndarray, ibm: np.ndarray, used_ib: np.ndarray, u0: int) -> None:
    """Soft-limit episodes (used >= soft_limit) over a clean stretch, as the reference:
    an episode opens at the push reaching the limit, closes when a reset brings used
    below it; pushes made at used >= limit before any exit of the episode are past it."""
    limit = ring.res.size - ring.reserved  # type: ignore[operator]
    if ring.soft is None and (not len(used_ib) or int(used_ib.max()) < limit):
        return
    ev = np.flatnonzero(ibm | (kind == _EXIT))
    if not len(ev):
        return
    isib = ibm[ev]
    carry = np.maximum.accumulate(np.where(isib, np.arange(len(ev)), -1))
    u_ib = np.zeros(len(ev), dtype=np.int64)
    u_ib[isib] = used_ib
    u = np.where(carry >= 0, u_ib[np.maximum(carry, 0)], u0)
    inn = u >= limit
    prev = np.empty_like(inn)
    prev[0] = ring.soft is not None
    prev[1:] = inn[:-1]
    start = inn & ~prev
    ep = np.cumsum(start)
    ek = kind[ev]
    ex_in = (ek == _EXIT) & inn
    cnt = np.cumsum(ex_in)
    base = np.maximum.accumulate(np.where(start, cnt - ex_in, 0))
    exited = (cnt - base) > 0
    if ring.soft is not None and ring.soft["exited"]:
        exited |= ep == 0
    push_in = (ek == _PUSH) & inn
    past = push_in & (u > limit) & ~exited
    n_ep = int(ep[-1]) + 1
    last_ep = int(ep[-1]) if inn[-1] else -1
    past_n = np.bincount(ep[past], minlength=n_ep)
    has_exit = np.bincount(ep[ex_in], minlength=n_ep) > 0
    todo = set(np.flatnonzero((past_n > 0) & ~has_exit).tolist())
    todo.discard(0)
    if ring.soft is not None:
        todo.add(0)
    if last_ep > 0:
        todo.add(last_ep)
    if not todo:
        return
    pi = np.flatnonzero(push_in)
    pe = ep[pi]
    for e in sorted(todo):
        lo, hi = np.searchsorted(pe, e), np.searchsorted(pe, e, side="right")
        mx = int(u[pi[lo:hi]].max()) if hi > lo else -1
        if e == 0:
            st = ring.soft
            assert st is not None
        else:
            st = {"exited": False, "past": 0, "first": None, "max_used": int(u[pi[lo]])}
        st["exited"] = st["exited"] or bool(has_exit[e])
        st["past"] += int(past_n[e])
        st["max_used"] = max(st["max_used"], mx)
        if st["first"] is None and past_n[e]:
            k = int(ev[pi[lo:hi][past[pi[lo:hi]]][0]])
            st["first"] = (int(ts[k]), int(cdi[k]), int(cri[k]))
        ring.soft = st
        if e != last_ep:
            ring.close_soft()
    if last_ep < 0:
        ring.soft = None
