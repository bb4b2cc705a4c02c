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

from ..model.ring import s32
from ..source.events import Kind
from .ringstate import M32, FastRing

__all__ = ["Cols", "feed_ring"]

_PUSH, _RESET, _EXIT, _STALL = int(Kind.PUSH), int(Kind.RESET), int(Kind.EXIT), int(Kind.STALL)


@dataclass
class Cols:
    """One ring's events of a batch, in time order, as plain arrays."""

    ts: np.ndarray  # u64 ns
    kind: np.ndarray  # u8
    di: np.ndarray  # u32 dirty_index
    ri: np.ndarray  # u32 reset_index
    slot: np.ndarray  # u32
    off: np.ndarray  # u64 (event value)

    def __len__(self) -> int:
        return len(self.kind)

    def take(self, sel: np.ndarray) -> Cols:
        """The events at indices ``sel`` (copies)."""
        return Cols(*(np.take(x, sel) for x in (self.ts, self.kind, self.di, self.ri,
                                                 self.slot, self.off)))

    def slice(self, a: int, b: int) -> Cols:
        """Events a..b (views)."""
        return Cols(self.ts[a:b], self.kind[a:b], self.di[a:b], self.ri[a:b],
                    self.slot[a:b], self.off[a:b])


@dataclass
class _Pre:
    """What :func:`_clean_prefix` computed over the pushes and resets of ``c[a:]``, for
    :func:`_bulk` to reuse when the clean stretch is all of it."""

    ib: np.ndarray | None  # positions of the pushes/resets; None: every event is one
    di: np.ndarray  # u32, at ib
    ri: np.ndarray  # u32, at ib
    used: np.ndarray  # i32 dirty_index - reset_index (serial arithmetic), at ib
    push: np.ndarray  # bool, at ib


def _s32(x: np.ndarray) -> np.ndarray:
    """u32 differences as signed (serial-number arithmetic), without a copy."""
    return x.astype(np.uint32, copy=False).view(np.int32)


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
        k, pre = _clean_prefix(ring, c, i)
        if k:
            _bulk(ring, c, i, i + k, pre if i + k == n else None)
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


def _pushes_resets(ring: FastRing, c: Cols, a: int, b: int) -> _Pre | None:
    kind = c.kind[a:b]
    push = kind == _PUSH
    ibm = push | (kind == _RESET)
    nib = int(np.count_nonzero(ibm))
    if not nib:
        return None
    if nib == len(kind):
        ib = None
        di, ri = c.di[a:b], c.ri[a:b]
    else:
        ib = np.flatnonzero(ibm)
        di, ri, push = c.di[a:b][ib], c.ri[a:b][ib], push[ib]
    return _Pre(ib, di, ri, _s32(di - ri), push)


def _clean_prefix(ring: FastRing, c: Cols, a: int) -> tuple[int, _Pre | None]:
    """How many events from ``a`` form a clean stretch (see the module docstring)."""
    if ring.overflow is not None:
        return 0, None
    if ring.irregular:
        n = min(max(ring.used(), 0), ring.cap)
        expect = np.zeros(ring.cap, dtype=bool)
        ring.fill(expect, ring.reset, n, True)
        if n != ring.used() or not np.array_equal(expect, ring.live):
            return 0, None
        ring.irregular = False
    n = len(c) - a
    pre = _pushes_resets(ring, c, a, len(c))
    if pre is None:
        return n, None
    di, ri, used, push = pre.di, pre.ri, pre.used, pre.push
    dd = np.diff(di, prepend=np.uint32(ring.dirty))  # u32: 1 after a push, 0 at a reset
    dr = _s32(np.diff(ri, prepend=np.uint32(ring.reset)))
    bad = (dd != push) | np.where(push, (dr != 0) | (used > ring.cap), (dr < 0) | (used < 0))
    if not bad.any():
        return n, pre
    j = int(np.argmax(bad))
    return (j if pre.ib is None else int(pre.ib[j])), None


def _bulk(ring: FastRing, c: Cols, a: int, b: int, pre: _Pre | None) -> None:
    kind = c.kind[a:b]
    ts = c.ts[a:b]
    res = ring.res
    if pre is None:
        pre = _pushes_resets(ring, c, a, b)
    if pre is not None and pre.ib is None:  # pushes and resets only
        ib = np.arange(b - a)
        ppos = np.flatnonzero(pre.push)
        xpos = spos = ib[:0]
        ring.seen(ts[0], ts[-1])
    else:
        ppos = np.flatnonzero(kind == _PUSH)
        xpos = np.flatnonzero(kind == _EXIT)
        spos = np.flatnonzero(kind == _STALL)
        ib = pre.ib if pre is not None else ppos[:0]
        first = min(int(ib[0]) if len(ib) else b - a, int(xpos[0]) if len(xpos) else b - a)
        if first < b - a:
            last = max(int(ib[-1]) if len(ib) else -1, int(xpos[-1]) if len(xpos) else -1)
            ring.seen(ts[first], ts[last])
    if len(spos):
        res.stalls.add_many(c.off[a:b][spos])
    d0, r0 = ring.dirty, ring.reset
    if pre is not None:
        di, ri, used = pre.di, pre.ri, pre.used
        ring.indices(di[-1], ri[-1], int(used.max()))
        d1, r1 = int(di[-1]), int(ri[-1])
    else:
        di = ri = c.di[:0]
        used = _s32(di)
        d1, r1 = d0, r0
    np_ = len(ppos)
    res.pushes += np_
    res.resets += len(ib) - np_
    res.soft_full_exits += len(xpos)
    if ring.unconfirmed is not None and len(ib) > np_:
        rr = ri[~pre.push]  # type: ignore[union-attr]
        if (_s32(rr - np.uint32(ring.unconfirmed[3])) >= 0).any():
            ring.unconfirmed = None
    # harvest and storage
    adv = s32(r1 - r0)
    u_old = s32(d0 - r0)
    if adv > 0:
        old_n = max(0, min(adv, u_old))
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
    if np_ or adv > 0:
        ring.fill(ring.live, r0, max(0, u_old), False)
        ring.fill(ring.live, r1, max(0, s32(d1 - r1)), True)
    ring.dirty, ring.reset = d1, r1
    if len(xpos) or ring.exit_ts is not None:
        _exits(ring, ts, ppos, xpos, ib, di, ri, d0, r0, r1)
    if res.size is not None:
        _soft(ring, kind, ts, c.di[a:b], c.ri[a:b], ib, xpos, used, u_old)


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
          cri: np.ndarray, ib: np.ndarray, xpos: np.ndarray, used_ib: np.ndarray,
          u0: int) -> None:
    """Soft-limit episodes (used >= soft_limit) over a clean stretch, as the reference:
    an episode opens at the push reaching the limit, closes when a reset brings used
    below it; pushes made at used >= limit before any exit of the episode are past it.

    Only the events at or above the limit are looked at: the stretch's pushes/resets
    (``ib``, with ``used_ib``) and soft-full exits (``xpos``, at the used of the push or
    reset before them, else ``u0``), merged in event order by their rank among both."""
    limit = ring.res.size - ring.reserved  # type: ignore[operator]
    is_open = ring.soft is not None
    if not is_open and (not len(used_ib) or int(used_ib.max()) < limit):
        return
    n_ev = len(ib) + len(xpos)
    if not n_ev:
        return
    pi_in = np.flatnonzero(used_ib >= limit)
    pos = [ib[pi_in]]
    ranks = [pi_in + (np.searchsorted(xpos, ib[pi_in]) if len(xpos) else 0)]
    us = [used_ib[pi_in]]
    if len(xpos):
        j = np.searchsorted(ib, xpos) - 1
        ux = np.where(j >= 0, used_ib[np.maximum(j, 0)] if len(ib) else u0, u0)
        xin = np.flatnonzero(ux >= limit)
        pos.append(xpos[xin])
        ranks.append(xin + j[xin] + 1)
        us.append(ux[xin])
    pos_a, rank, u = np.concatenate(pos), np.concatenate(ranks), np.concatenate(us)
    if not len(rank):
        if is_open:
            ring.close_soft()
        return
    if len(pos) > 1:
        order = np.argsort(rank, kind="stable")
        pos_a, rank, u = pos_a[order], rank[order], u[order]
    prev = np.empty(len(rank), dtype=bool)
    prev[0] = is_open and rank[0] == 0
    prev[1:] = rank[1:] == rank[:-1] + 1
    start = ~prev
    ep = np.cumsum(start)
    ek = kind[pos_a]
    ex_in = ek == _EXIT
    cnt = np.cumsum(ex_in)
    base = np.maximum.accumulate(np.where(start, cnt - ex_in, 0))
    exited = (cnt - base) > 0
    if is_open and ring.soft["exited"]:  # type: ignore[index]
        exited |= ep == 0
    push_in = ek == _PUSH
    past = push_in & (u > limit) & ~exited
    n_ep = int(ep[-1]) + 1
    last_ep = int(ep[-1]) if rank[-1] == n_ev - 1 else -1
    past_n = np.bincount(ep[past], minlength=n_ep)
    has_exit = np.bincount(ep[ex_in], minlength=n_ep) > 0
    todo = set(np.flatnonzero((past_n > 0) & ~has_exit).tolist())
    todo.discard(0)
    if is_open:
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
            k = int(pos_a[pi[lo:hi][past[pi[lo:hi]]][0]])
            st["first"] = (int(ts[k]), int(cdi[k]), int(cri[k]))
        ring.soft = st
        if e != last_ep:
            ring.close_soft()
    if last_ep < 0:
        ring.soft = None
