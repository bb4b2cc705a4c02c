"""The replay's fast path: one ring's events of a batch, vectorised.

A stretch of a ring's events is *clean* when every push moves dirty_index by exactly one
with reset_index unchanged and leaves ``used <= size``, every reset event repeats
dirty_index and moves reset_index forward but not past it, no overflow episode is open and
the live flags equal the ``[reset_index, dirty_index)`` window. Then the reference
semantics reduce to index arithmetic: counters are sums, the harvested entries are those
of indices reset_start..reset_end (old ones from the ring arrays, new ones straight from
the batch's pushes), soft-limit episodes are runs of ``used >= soft_limit`` (soft-full
exits and episodes: :mod:`.exits`). Anything else goes to
:class:`~.ringstate.FastRing` event by event (pushes still in vectorised runs) up to the
ring's next reset event. The test for a clean stretch is a few passes over the pushes and
resets (:func:`_all_clean`); the exact first irregular event is only looked for when it
fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.events import Kind
from ...core.kvm_abi import U32_MASK, s32
from .exits import PushPos, exits, soft
from .ringstate import FastRing

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

    ib: PushPos | None  # positions of the pushes/resets; None: every event is one
    di: np.ndarray  # u32, at ib
    ri: np.ndarray  # u32, at ib
    used: np.ndarray  # i32 dirty_index - reset_index (serial arithmetic), at ib
    push: np.ndarray  # bool, at ib
    max_used: int | None = None  # used.max(), once computed
    xpos: np.ndarray | None = None  # positions of the soft-full exits
    spos: np.ndarray | None = None  # positions of the stalls
    other: np.ndarray | None = None  # positions of every event but the pushes
    rpos: np.ndarray | None = None  # positions of the resets (among ib)


def _s32(x: np.ndarray) -> np.ndarray:
    """u32 differences as signed (serial-number arithmetic), without a copy."""
    return x.astype(np.uint32, copy=False).view(np.int32)


def feed_ring(ring: FastRing, c: Cols,
              pushes: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Process all of ``c`` (one ring, time order). ``pushes``: the slot and offset of
    its pushes alone, in order, when the caller has them: they are then read from there,
    never from ``c.slot``/``c.off`` at pushes (which may hold anything)."""
    n, i, pi = len(c), 0, 0
    while i < n:
        if not ring.started:
            ib = np.flatnonzero((c.kind[i:] == _PUSH) | (c.kind[i:] == _RESET))
            j = i + int(ib[0]) if len(ib) else n - 1
            pi = _slow(ring, c, i, j + 1, pushes, pi)
            i = j + 1
            continue
        k, pre = _clean_prefix(ring, c, i)
        if k:
            pi += _bulk(ring, c, i, i + k, pre if i + k == n else None,
                        None if pushes is None else (pushes[0], pushes[1], pi))
            i += k
        if i < n:
            resets = np.flatnonzero(c.kind[i:] == _RESET)
            j = i + int(resets[0]) if len(resets) else n - 1
            pi = _slow(ring, c, i, j + 1, pushes, pi)
            i = j + 1


def _slow(ring: FastRing, c: Cols, a: int, b: int,
          pushes: tuple[np.ndarray, np.ndarray] | None, pi: int) -> int:
    """Events a..b one by one (runs of pushes at once); ``pi``: pushes before ``a``
    (index into ``pushes``). Returns the pushes before ``b``."""
    kind = c.kind
    i = a
    while i < b:
        k = int(kind[i])
        if k == _PUSH:
            rest = np.flatnonzero(kind[i:b] != _PUSH)
            e = i + int(rest[0]) if len(rest) else b
            if pushes is None:
                slot, off = c.slot[i:e], c.off[i:e]
            else:
                slot, off = pushes[0][pi:pi + e - i], pushes[1][pi:pi + e - i]
            ring.push_run(c.ts[i:e], c.di[i:e], c.ri[i:e], slot, off)
            pi += e - i
            i = e
            continue
        ts = int(c.ts[i])
        if k == _RESET:
            ring.on_reset(ts, int(c.di[i]), int(c.ri[i]))
        elif k == _EXIT:
            ring.on_exit(ts)
        elif k == _STALL:
            ring.on_stall(int(c.off[i]))
        i += 1
    return pi


def _pushes_resets(ring: FastRing, c: Cols, a: int, b: int) -> _Pre | None:
    kind = c.kind[a:b]
    push = kind == _PUSH
    other = np.flatnonzero(kind != _PUSH)  # resets, exits, stalls: few
    okind = kind[other]
    xpos, spos = other[okind == _EXIT], other[okind == _STALL]
    rpos = other[okind == _RESET]
    if not len(xpos) and not len(spos):
        if not len(kind):
            return None
        ib = None
        di, ri = c.di[a:b], c.ri[a:b]
    else:
        # the pushes and resets: every event but the exits and stalls (few), by their
        # positions (no array of theirs) and a mask (compressing by it is cheaper
        # than gathering at their positions)
        xs = other[okind != _RESET]
        ib = PushPos(xs, len(kind))
        if not len(ib):
            return None
        keep = np.ones(len(kind), dtype=bool)
        keep[xs] = False
        # the resets' places among pushes and resets: minus the exits/stalls before them
        rpos = rpos - np.searchsorted(xs, rpos)
        di, ri = c.di[a:b][keep], c.ri[a:b][keep]
        push = np.ones(len(ib), dtype=bool)
        push[rpos] = False
    return _Pre(ib, di, ri, _s32(di - ri), push, xpos=xpos, spos=spos, other=other,
                rpos=rpos)


def _clean_prefix(ring: FastRing, c: Cols, a: int) -> tuple[int, _Pre | None]:
    """How many events from ``a`` form a clean stretch (see the module docstring)."""
    if ring.overflow is not None:
        return 0, None
    if not ring.window_regular():
        return 0, None
    n = len(c) - a
    pre = _pushes_resets(ring, c, a, len(c))
    if pre is None:
        return n, None
    if _all_clean(ring, pre):
        return n, pre
    di, ri, used, push = pre.di, pre.ri, pre.used, pre.push
    dd = np.diff(di, prepend=np.uint32(ring.dirty))  # u32: 1 after a push, 0 at a reset
    dr = _s32(np.diff(ri, prepend=np.uint32(ring.reset)))
    bad = (dd != push) | np.where(push, (dr != 0) | (used > ring.cap), (dr < 0) | (used < 0))
    if not bad.any():
        return n, pre
    j = int(np.argmax(bad))
    return (j if pre.ib is None else pre.ib.at(j)), None


def _all_clean(ring: FastRing, pre: _Pre) -> bool:
    """A sufficient test that every push/reset of ``pre`` is clean, in few passes (the
    exact first bad event is found by the caller otherwise): dirty_index steps are at most
    1 and add up to the number of pushes, zero at each reset; reset_index only moves, and
    forward, at resets; 0 <= used <= size throughout."""
    di, ri, push = pre.di, pre.ri, pre.push
    m = len(di)
    assert pre.rpos is not None
    npush = m - len(pre.rpos)
    d_first, r_first = int(di[0]), int(ri[0])
    if ((d_first - ring.dirty) & U32_MASK) != (1 if push[0] else 0):
        return False
    dr0 = (r_first - ring.reset) & U32_MASK
    if (push[0] and dr0) or dr0 >= 1 << 31:
        return False
    if m > 1:
        dd = di[1:] - di[:-1]
        if int(dd.max()) > 1 or ((int(di[-1]) - d_first) & U32_MASK) != npush - bool(push[0]):
            return False
        rs = pre.rpos[pre.rpos > 0] - 1  # resets after the first event, in dd/dr
        if len(rs) and dd[rs].any():
            return False
        dr = ri[1:] - ri[:-1]
        nz = int(np.count_nonzero(dr))
        if nz:
            drr = dr[rs]
            if np.count_nonzero(drr) != nz or (_s32(drr) < 0).any():
                return False
    pre.max_used = int(pre.used.view(np.uint32).max())
    return pre.max_used <= ring.cap


def _bulk(ring: FastRing, c: Cols, a: int, b: int, pre: _Pre | None,
          pushes: tuple[np.ndarray, np.ndarray, int] | None = None) -> int:
    """The clean stretch a..b; returns its number of pushes."""
    kind = c.kind[a:b]
    ts = c.ts[a:b]
    if pre is None:
        pre = _pushes_resets(ring, c, a, b)
    if pre is not None and pre.other is not None:
        pp = PushPos(pre.other, b - a)
    else:
        pp = PushPos(np.flatnonzero(kind != _PUSH), b - a)
    ppos = None if pushes is not None else np.flatnonzero(kind == _PUSH)
    if pre is not None and pre.ib is None:  # pushes and resets only
        xpos = spos = np.zeros(0, np.intp)
        ib = PushPos(xpos, b - a)
        ring.seen(ts[0], ts[-1])
    else:
        if pre is not None and pre.xpos is not None and pre.spos is not None:
            xpos, spos = pre.xpos, pre.spos
        else:
            xpos = np.flatnonzero(kind == _EXIT)
            spos = np.flatnonzero(kind == _STALL)
        ib = pre.ib if pre is not None and pre.ib is not None else PushPos(
            np.arange(b - a), b - a)  # none
        first = min(ib.at(0) if len(ib) else b - a, int(xpos[0]) if len(xpos) else b - a)
        if first < b - a:
            last = max(ib.at(len(ib) - 1) if len(ib) else -1,
                       int(xpos[-1]) if len(xpos) else -1)
            ring.seen(ts[first], ts[last])
    d0, r0 = ring.dirty, ring.reset
    if pre is not None:
        di, ri, used = pre.di, pre.ri, pre.used
        ring.indices(di[-1], ri[-1], int(used.max()) if pre.max_used is None else pre.max_used)
        d1, r1 = int(di[-1]), int(ri[-1])
    else:
        di = ri = c.di[:0]
        used = _s32(di)
        d1, r1 = d0, r0
    np_ = len(pp)
    ring.count_clean(np_, len(ib) - np_, len(xpos), c.off[a:b][spos])
    if ring.unconfirmed is not None and len(ib) > np_:
        ring.confirm_resets(ri[~pre.push])  # type: ignore[union-attr]
    # harvest and storage
    adv = s32(r1 - r0)
    u_old = s32(d0 - r0)
    if adv > 0:
        old_n = max(0, min(adv, u_old))
        if old_n:
            ring.collect(r0, old_n)
        new_n = adv - old_n
        if new_n:
            if pushes is not None:
                ps, po, p0 = pushes
                hs, ho = ps[p0:p0 + new_n], po[p0:p0 + new_n]
            else:
                assert ppos is not None
                hs, ho = c.slot[a:b][ppos[:new_n]], c.off[a:b][ppos[:new_n]]
            ring.collect_new(hs, ho)
        ring.reset_progress(adv, bool(len(xpos)))
    if np_:
        k = min(np_, ring.cap)
        if pushes is not None:
            ps, po, p0 = pushes
            ring.store_pushes(d1, ps[p0 + np_ - k:p0 + np_], po[p0 + np_ - k:p0 + np_], np_)
        else:
            assert ppos is not None
            ring.store_pushes(d1, c.slot[a:b][ppos[-k:]], c.off[a:b][ppos[-k:]], np_)
    if np_ or adv > 0:
        ring.move_window(d1, r1, u_old)
    if len(xpos) or ring.exit_ts is not None:
        exits(ring, ts, pp, xpos, ib, di, ri, d0, r0, r1)
    if ring.res.size is not None:
        soft(ring, kind, ts, c.di[a:b], c.ri[a:b], ib, xpos, used, u_old)
    return np_
