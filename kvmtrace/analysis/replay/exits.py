"""Soft-full exits and soft-limit episodes over a clean stretch of one ring's events (the
fast path of :mod:`.bulk`): livelock episodes, exit -> next push times, pushes past the
soft limit (``size - reserved`` entries of ``struct kvm_dirty_ring``) without an exit, as
:mod:`kvmtrace.testing.reference` defines them, vectorised over the stretch.
"""

from __future__ import annotations

import numpy as np

from ...core.events import Kind
from ...model.results import SoftEpisode
from .ringstate import FastRing

__all__ = ["PushPos", "exits", "soft"]

_PUSH, _EXIT = int(Kind.PUSH), int(Kind.EXIT)


class PushPos:
    """Positions of the pushes among ``n`` events, from those of the others (few), without
    an array of them: ``at(p)`` is the p-th push's, ``before(x)`` counts pushes before the
    (non-push) positions ``x``. The same for any events kept among ``n`` given the
    positions of those left out (ascending), e.g. the pushes and resets of a stretch
    (:mod:`.bulk`)."""

    def __init__(self, other: np.ndarray, n: int) -> None:
        self.other = other
        self.key = other - np.arange(len(other))  # pushes before each other event
        self.n = n - len(other)

    def __len__(self) -> int:
        return self.n

    def at(self, p: int) -> int:
        return p + int(np.searchsorted(self.key, p, side="right"))

    def at_many(self, p: np.ndarray) -> np.ndarray:
        return p + np.searchsorted(self.key, p, side="right")

    def before(self, x: np.ndarray) -> np.ndarray:
        return x - np.searchsorted(self.other, x)


def exits(ring: FastRing, ts: np.ndarray, pp: PushPos, xpos: np.ndarray,
           ib: PushPos, dis: np.ndarray, ris: np.ndarray, d0: int, r0: int,
           r1: int) -> None:
    """Soft-full exits: livelock episodes and exit -> next push times, in event order."""
    if ring.exit_ts is not None and len(pp) and (not len(xpos) or pp.at(0) < xpos[0]):
        ring.push_after_exit(int(ts[pp.at(0)]))
    if not len(xpos):
        return
    j = ib.before(xpos) - 1
    rxs = np.where(j >= 0, ris[np.maximum(j, 0)] if len(ris) else r0, r0).astype(np.int64)
    nxt = pp.before(xpos)
    # exit -> the next push, when it comes before the next exit (durations commute)
    n = len(pp)
    if n:
        pn = pp.at_many(np.minimum(nxt, n - 1))
        nextx = np.append(xpos[1:], np.iinfo(np.intp).max)
        ok = (nxt < n) & (pn < nextx)
        ring.exit_to_push_many(ts[pn[ok]].astype(np.int64) - ts[xpos[ok]].astype(np.int64))
    last = np.concatenate(([-1 if ring.last_exit_reset is None else ring.last_exit_reset],
                           rxs[:-1]))
    if not (rxs == last).any():  # no exit without reset progress: no livelock step
        prev = np.concatenate(([r0], rxs[:-1]))
        if (rxs != prev).any() or r1 != int(rxs[-1]):
            ring.end_livelock()
        last_reset = int(rxs[-1])
    else:
        prev_reset = r0
        for q, x in enumerate(xpos.tolist()):
            dx, rx = (int(dis[j[q]]), int(ris[j[q]])) if j[q] >= 0 else (d0, r0)
            if rx != prev_reset:
                ring.end_livelock()
            prev_reset = rx
            ring.exit_livelock(int(ts[x]), dx, rx)
        if r1 != prev_reset:
            ring.end_livelock()
        last_reset = None  # exit_livelock kept it
    ring.after_exits(last_reset, int(ts[xpos[-1]]) if nxt[-1] >= n else None)


def soft(ring: FastRing, kind: np.ndarray, ts: np.ndarray, cdi: np.ndarray,
          cri: np.ndarray, ib: PushPos, xpos: np.ndarray, used_ib: np.ndarray,
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
    at = ib.at_many(pi_in)
    pos = [at]
    ranks = [pi_in + (np.searchsorted(xpos, at) if len(xpos) else 0)]
    us = [used_ib[pi_in]]
    if len(xpos):
        j = ib.before(xpos) - 1
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
    if is_open and ring.soft.exited:  # type: ignore[union-attr]
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
            st = SoftEpisode(max_used=int(u[pi[lo]]))
            ring.open_soft(st)
        first = None
        if st.first is None and past_n[e]:
            k = int(pos_a[pi[lo:hi][past[pi[lo:hi]]][0]])
            first = (int(ts[k]), int(cdi[k]), int(cri[k]))
        st.add(exited=bool(has_exit[e]), past=int(past_n[e]), max_used=mx, first=first)
        if e != last_ep:
            ring.close_soft()
    assert last_ep >= 0 or ring.soft is None
