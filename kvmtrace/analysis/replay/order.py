"""Causal order of one ring's events, for the fast replay (docs/FORMAT.md, "Causal order").

A ring's events come from two threads: the vCPU's (pushes, soft-full exits, stalls: the
*vCPU stream*, in trace order) and the harvester's (``kvm_dirty_ring_reset``: the *reset
stream*). A reset's ``dirty_index`` D is a snapshot the harvester read while the vCPU kept
pushing (the push tracepoint fires after ``dirty_index++``), and timestamps of the two
threads disagree (microsecond text, cross-CPU skew, reservation order), so the trace order
of a reset and the pushes around it is not causal. The rule: a reset with dirty_index D goes
after push D and before push D + 1 (u32 serial arithmetic); between the two, resets and the
vCPU's exits/stalls (whose index is the vCPU's last push) are ordered by time, then by
trace order.

It is applied as a streaming merge of the two streams with bounded look-ahead, defined one
event at a time (:class:`kvmtrace.testing.reference.ReferenceReplay` implements the same
definition plainly):

- a reset is taken before the vCPU event at the head of its stream when that event comes
  after it by the rule above;
- with no vCPU event waiting, a reset whose D is beyond the vCPU's last push (or that comes
  before any push) waits (at most :data:`HOLD_RESETS` of them) for push D; any other is
  taken at once;
- with no reset waiting, vCPU events wait while there are at most :data:`HOLD_VCPU` of
  them: a reset that arrives later can still go before those;
- a barrier (end of trace, a ring size, a VM's first soft-full exit of unknown size)
  drains what waits, in merge order.

:func:`order_segment` takes a ring's carried events plus a new segment, returns the events
it may process now in causal order and keeps the rest. The common case (pushes in index
order) is vectorised: reset positions by ``searchsorted``; segments where the vectorised
merge could differ from the one-event-at-a-time definition go through :func:`_merge_slow`.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ...core.events import Kind
from ...core.kvm_abi import U32_MASK, s32
from .bulk import Cols

__all__ = ["HOLD_VCPU", "HOLD_RESETS", "RingOrder", "order_segment", "concat_cols"]

#: vCPU events a later reset may still go before (pushes arrive within microseconds of
#: the reset that read their index; 64 is far beyond any race seen)
HOLD_VCPU = 64
#: resets waiting for the push their dirty_index names (lost pushes release them)
HOLD_RESETS = 1024

_PUSH, _RESET = int(Kind.PUSH), int(Kind.RESET)
_FIELDS = ("ts", "kind", "di", "ri", "slot", "off")


class RingOrder:
    """Per ring: the events waiting (arrival order) and the vCPU's last pushes."""

    __slots__ = ("carry", "prev_push", "last_push", "identity")

    def __init__(self) -> None:
        self.carry: Cols | None = None
        self.prev_push: int | None = None  #: di of the last push handed on
        self.last_push: int | None = None  #: di of the last push arrived
        #: the last result was the carried events then the segment's, in trace order
        self.identity = True


def concat_cols(a: Cols, b: Cols) -> Cols:
    return Cols(*(np.concatenate((getattr(a, f), getattr(b, f))) for f in _FIELDS))


def _take(c: Cols, sel: np.ndarray) -> Cols:
    return c.take(sel)


def _last_push(c: Cols, emitted: np.ndarray | None, before: int | None,
               upto: int | None = None) -> int | None:
    """dirty_index of the last push among ``c`` (or its events ``emitted``, or its first
    ``upto``)."""
    if emitted is None:
        kind = c.kind if upto is None else c.kind[:upto]
        tail = np.flatnonzero(kind[-HOLD_VCPU:] == _PUSH)  # a push is near the end
        if len(tail):
            return int(c.di[len(kind) - min(HOLD_VCPU, len(kind)) + int(tail[-1])])
    else:
        kind = c.kind[emitted]
    p = np.flatnonzero(kind == _PUSH)
    if not len(p):
        return before
    j = int(p[-1]) if emitted is None else int(emitted[p[-1]])
    return int(c.di[j])


def order_segment(ro: RingOrder, c: Cols, drain: bool = False) -> Cols | None:
    """Add ``c`` (one ring's events in trace order) to the waiting ones; returns the events
    to process now in causal order (None: nothing), keeping the rest in ``ro``."""
    x = c if ro.carry is None or not len(ro.carry) else (
        concat_cols(ro.carry, c) if len(c) else ro.carry)
    ro.carry = None
    n = len(x)
    if not n:
        return None
    kind = x.kind
    rpos = np.flatnonzero(kind == _RESET)
    if not len(rpos):  # the vCPU stream alone: only the hold
        ro.last_push = _last_push(x, None, ro.last_push)
        keep = 0 if drain else min(HOLD_VCPU, n)
        return _split(ro, x, None, n - keep)
    if len(rpos) == n:  # resets alone
        return _resets_only(ro, x, drain)
    cut = _in_place(ro, x, drain)
    if cut is not None:
        return _split(ro, x, None, cut)
    out = _merge_fast(ro, x, rpos, drain)
    if out is None:
        order, cut = _merge_slow(ro, x, drain)
        ro.last_push = _last_push(x, None, ro.last_push)
        return _split(ro, x, order, cut)
    return out


def _split(ro: RingOrder, x: Cols, order: np.ndarray | None, cut: int) -> Cols | None:
    """Hand on ``order[:cut]`` (None: identity), keep ``order[cut:]``."""
    n = len(x)
    ro.identity = order is None
    if order is None:
        if cut < n:
            ro.carry = x.slice(cut, n)
            ro.carry = Cols(*(_own(getattr(ro.carry, f)) for f in _FIELDS))
        out = x if cut == n else (x.slice(0, cut) if cut else None)
        ro.prev_push = _last_push(x, None, ro.prev_push, cut) if cut else ro.prev_push
        return out
    if cut < n:
        ro.carry = _take(x, order[cut:])
    ro.prev_push = _last_push(x, order[:cut], ro.prev_push) if cut else ro.prev_push
    return _take(x, order[:cut]) if cut else None


def _own(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` that holds none of its memory (a block's, maybe shared); one
    value (a broadcast view) stays one, so that the ring's next columns joined to it stay
    one value where theirs are (e.g. one memslot: see :func:`~.colfeed.join_ring_cols`)."""
    if a.strides == (0,) and len(a):
        return np.broadcast_to(a[0], a.shape)
    return np.array(a)


def _beyond(d: int, last: int | None) -> bool:
    """A reset at dirty_index ``d`` waits for a push: none seen yet, or not push d."""
    return last is None or s32(d - last) > 0


def _resets_only(ro: RingOrder, x: Cols, drain: bool) -> Cols | None:
    n = len(x)
    if drain:
        return _split(ro, x, None, n)
    last = ro.last_push
    for i, d in enumerate(x.di.tolist()):
        if _beyond(d, last):
            if n - i > HOLD_RESETS:
                break  # the cap releases them one by one: exact loop
            return _split(ro, x, None, i)
    else:
        return _split(ro, x, None, n)
    order, cut = _merge_slow(ro, x, drain)
    return _split(ro, x, order, cut)


def _in_place(ro: RingOrder, x: Cols, drain: bool) -> int | None:
    """The common case in few passes: pushes step by one from the last one handed on,
    every reset repeats the dirty_index of the push before it, and resets and exits/stalls
    between the same two pushes are in time order; the trace order is then the causal
    order. Returns how many events to hand on (the rest is the vCPU hold), else None."""
    prev = ro.prev_push
    if prev is None:
        return None
    kind, di, n = x.kind, x.di, len(x)
    isother = kind != _PUSH  # membership by this mask, not np.isin (a sort per call)
    opos = np.flatnonzero(isother)  # resets, exits, stalls: few
    bad = np.flatnonzero((di[1:] - di[:-1]) != 1)  # u32: pushes step by one
    if len(bad) and not (isother[bad] | isother[bad + 1]).all():
        return None
    after = opos - 1
    cand = np.where(~isother[np.maximum(after, 0)] & (after >= 0), after, -1)
    pb = np.maximum.accumulate(cand)  # the last push before each other event, or -1
    dprev = np.where(pb >= 0, di[np.maximum(pb, 0)], np.uint32(prev & U32_MASK))
    isr = kind[opos] == _RESET
    if (di[opos[isr]] != dprev[isr]).any():
        return None  # a reset not right after the push it names
    nxt = opos + 1
    first = np.where(~isother[np.minimum(nxt, n - 1)] & (nxt < n), nxt, n)
    na = np.minimum.accumulate(first[::-1])[::-1]  # the next push after each, or n
    has = na < n
    if ((di[np.minimum(na, n - 1)] - dprev) != 1)[has].any():
        return None  # pushes do not step by one across the other events
    if kind[0] == _PUSH and int(di[0]) != (prev + 1) & U32_MASK:
        return None
    same = pb[1:] == pb[:-1]  # other events between the same two pushes: by time
    if same.any():
        ts = x.ts[opos]
        if (ts[1:][same] < ts[:-1][same]).any():
            return None
    last_push = int(di[n - 1]) if kind[n - 1] == _PUSH else (
        int(dprev[-1]) if len(opos) else prev)
    ro.last_push = last_push
    if drain:
        return n
    rpos = opos[isr]
    trailing = n - 1 - int(rpos[-1])
    return n - min(HOLD_VCPU, trailing)


def _merge_fast(ro: RingOrder, x: Cols, rpos: np.ndarray, drain: bool) -> Cols | None:
    """The merge when the vCPU stream's pushes step forward; None when the slow merge must
    decide (see the checks)."""
    n = len(x)
    isv = np.ones(n, dtype=bool)
    isv[rpos] = False
    vpos = np.flatnonzero(isv)
    vkind = x.kind[vpos]
    vpush = vkind == _PUSH
    ppos = np.flatnonzero(vpush)
    pdi = x.di[vpos[ppos]]
    prev = ro.prev_push
    if prev is None:
        if not len(ppos) or ppos[0] != 0:
            return None  # vCPU events before any push: ordered by time, slow merge
        ref = int(pdi[0]) - 1
    else:
        ref = prev
    steps = np.diff(pdi, prepend=np.uint32(ref & U32_MASK)).view(np.int32)
    if len(steps) and int(steps.min()) <= 0:
        return None  # pushes not in index order (lost, repeated or reordered events)
    rel = np.cumsum(steps, dtype=np.int64)  # push dirty_index - ref
    # key of every vCPU event: its push's index, else the last push's before it
    cnt = np.cumsum(vpush) - 1
    kv = np.where(cnt >= 0, rel[np.maximum(cnt, 0)] if len(rel) else 0, 0)
    rd = x.di[rpos].astype(np.int64)
    drel = (rd - ref + (1 << 31)) % (1 << 32) - (1 << 31)  # serial distance to ref
    lo = np.searchsorted(kv, drel, "left")
    pos = np.searchsorted(kv, drel, "right")
    # a tie (an exit/stall at the reset's index): by time, then trace order
    tie = (pos > lo) & ((pos - lo > 1) | ~vpush[np.maximum(pos - 1, 0)])
    if tie.any():
        ts, tl, at = x.ts, tie.tolist(), 0
        for i in range(len(rpos)):
            if tl[i]:
                tr = (int(ts[rpos[i]]), int(rpos[i]))
                j, hi = max(int(lo[i]), at), int(pos[i])
                while j < hi and (vpush[j] or (int(ts[vpos[j]]), int(vpos[j])) < tr):
                    j += 1
                at = j
            else:
                at = max(int(pos[i]), at)
            pos[i] = at
    else:
        pos = np.maximum.accumulate(pos)
    nvb = np.searchsorted(vpos, rpos)  # vCPU events arrived before each reset
    over = nvb - pos
    if int(over.max()) > HOLD_VCPU:
        return None  # a reset later than the hold: the hold decides
    wait = np.flatnonzero(over < 0)
    if len(wait):
        # a waiting reset is taken as soon as the vCPU's last push reaches its index
        # (then events at that index arriving later go after it): rare, slow merge
        before = pos[wait] - 2
        kb = np.where(before >= 0, kv[np.maximum(before, 0)],
                      0 if prev is not None else np.iinfo(np.int64).min)
        if (kb == drel[wait]).any():
            return None
        emit_at = np.where(pos < len(vpos), vpos[np.minimum(pos, len(vpos) - 1)], n)
        emit_at = np.maximum(emit_at, rpos)
        qlen = np.arange(1, len(rpos) + 1) - np.searchsorted(emit_at, rpos, "right")
        if int(qlen.max(initial=0)) > HOLD_RESETS:
            return None
    ro.last_push = int(pdi[-1]) if len(pdi) else ro.last_push
    nv, nr = len(vpos), len(rpos)
    # what waits at the end: the trailing vCPU events (hold) or the resets beyond the push
    cut = n
    if not drain:
        if int(pos[-1]) < nv:
            cut = n - min(HOLD_VCPU, nv - int(pos[-1]))
        else:
            tail = np.flatnonzero(pos == nv)
            trel = drel[tail]
            last_rel = int(rel[-1]) if len(rel) else 0
            beyond = np.flatnonzero(trel > last_rel)
            if len(beyond):
                first = int(tail[beyond[0]])
                if nr - first > HOLD_RESETS:
                    return None
                cut = int(pos[first]) + first
    if bool((over == 0).all()):
        return _split(ro, x, None, cut)
    order = np.empty(n, dtype=np.intp)
    order[pos + np.arange(nr)] = rpos
    order[np.arange(nv) + np.searchsorted(pos, np.arange(nv), "right")] = vpos
    return _split(ro, x, order, cut)


def _merge_slow(ro: RingOrder, x: Cols, drain: bool) -> tuple[np.ndarray, int]:
    """The definition, one event at a time: (causal order of ``x``'s events, how many of
    them to hand on now)."""
    kind, di, ts = x.kind.tolist(), x.di.tolist(), x.ts.tolist()
    last = ro.prev_push
    key: list[int | None] = [None] * len(kind)
    vq: deque[int] = deque()
    rq: deque[int] = deque()
    out: list[int] = []

    def before(r: int, v: int) -> bool:
        k = key[v]
        if k is None:
            return (ts[r], r) < (ts[v], v)
        d = s32(k - di[r])
        return d > 0 or (d == 0 and kind[v] != _PUSH and (ts[r], r) < (ts[v], v))

    def pump(final: bool) -> None:
        while True:
            if rq and vq:
                out.append(rq.popleft() if before(rq[0], vq[0]) else vq.popleft())
            elif rq:
                if final or not _beyond(di[rq[0]], last) or len(rq) > HOLD_RESETS:
                    out.append(rq.popleft())
                else:
                    return
            elif vq:
                if final or len(vq) > HOLD_VCPU:
                    out.append(vq.popleft())
                else:
                    return
            else:
                return

    for k in range(len(kind)):
        if kind[k] == _RESET:
            rq.append(k)
        else:
            if kind[k] == _PUSH:
                last = di[k]
            key[k] = last
            vq.append(k)
        pump(False)
    cut = len(out)
    if drain:
        pump(True)
        cut = len(out)
    out.extend(vq)
    out.extend(rq)
    return np.array(out, dtype=np.intp), cut
