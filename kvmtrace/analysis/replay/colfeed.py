"""Per-ring columns straight from a source's :class:`~kvmtrace.core.columns.EventColumns`
(a recording's blocks as stored), for :meth:`Replay.feed_columns`.

The columns are group-major (a group is one (pid, tid, vm, ring, kind)). Instead of
building 48-byte ``struct kt_event`` records and splitting them per ring again, the
block's groups are mapped to rings (``struct kvm_dirty_ring``, keyed (pid, vm, vCPU
index)) and each column is gathered once per block into ring-major, time-ordered arrays;
a ring's events are then plain slices of them. The pushes of a ring written by one thread
are one group, i.e. contiguous slices of the stored columns, which the working set reads
directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.columns import EventColumns
from ...core.events import Kind
from ...model.results import RingId
from .bulk import Cols
from .workingset import PushTimes

__all__ = ["COLUMN_BATCH", "RingCols", "RingGroups", "join_ring_cols",
           "ring_columns", "ring_keys", "share_events"]

_PUSH, _STALL = int(Kind.PUSH), int(Kind.STALL)
_COLS = ("dirty_index", "reset_index", "slot", "value")
#: Events of consecutive blocks a replay feeds a ring at once: larger steps cost less
#: per event. Each block is split per ring on its own (its arrays stay in cache: split
#: after merging blocks was slower), the rings' columns are then joined. 2**18: on the
#: 8 M-event stream of tools/bench_parallel.py (blocks of ~65 k events) one core spent
#: 0.66 s against 0.72 s at 2**17 and 0.74 s at 2**19 (min CPU of 8 rounds, alternated).
COLUMN_BATCH = 1 << 18


@dataclass
class RingCols:
    """One ring's events of a block in time order, and its pushes (times, slot u32,
    offset u64) when one group holds all of them (else None: select by kind)."""

    key: RingId
    cols: Cols
    pushes: tuple[np.ndarray | PushTimes, np.ndarray, np.ndarray] | None


def _push_times(parts: EventColumns, a: int, e: int) -> PushTimes:
    """Times of the group-major events a..e (one group): their ends now, the array (a
    gather in time order) only if the working set asks for it."""
    if parts.order is None:
        return PushTimes.of(parts.ts[a:e])
    order, ts = parts.order, parts.ts
    return PushTimes(e - a, int(ts[order[a]]), int(ts[order[e - 1]]),
                     lambda: np.take(ts, order[a:e]))


def _same(n: int, value: np.generic) -> np.ndarray:
    """``n`` times ``value`` (its dtype) without writing them: a read-only broadcast view
    (a per-group constant column, e.g. one memslot, costs no memory per event)."""
    return np.broadcast_to(value, (n,))


def _grouped(parts: EventColumns, name: str, g: int, a: int, b: int) -> np.ndarray:
    if name in parts.const:
        return _same(b - a, parts.const[name][g])
    return parts.grouped[name][a:b]


def _column(parts: EventColumns, name: str, idx: np.ndarray, gsel: np.ndarray | None
            ) -> np.ndarray:
    """Column ``name`` at group-major positions ``idx`` (groups ``gsel``)."""
    if name in parts.const:
        c = parts.const[name]
        if gsel is None or int(c.min()) == int(c.max()):
            return _same(len(idx), c[0])
        return np.take(c, gsel)
    return np.take(parts.grouped[name], idx)  # np.take: faster than indexing here


def ring_keys(table: np.ndarray) -> list[tuple[RingId, bool]]:
    """The rings of a group table (kinds PUSH..STALL) in (pid, vm, index) order, each with
    whether it has pushes."""
    keys: dict[RingId, bool] = {}
    for p, v, r, k in zip(table["pid"].tolist(), table["vm"].tolist(),
                          table["ring"].tolist(), table["kind"].tolist(), strict=True):
        if _PUSH <= k <= _STALL:
            keys[(p, v, r)] = keys.get((p, v, r), False) or k == _PUSH
    return sorted(keys.items())


@dataclass(frozen=True)
class RingGroups:
    """A group table's rings (kinds PUSH..STALL; of the groups selected), in (pid, vm,
    index) order, each with its group numbers: what :func:`ring_columns` reads of the
    table, the same for every block with that table."""

    keys: list[RingId]
    members: list[list[int]]
    kinds: np.ndarray  #: each group's kind (intp)

    @staticmethod
    def of(table: np.ndarray, groups: np.ndarray | None = None) -> RingGroups:
        kinds = table["kind"].astype(np.intp)
        valid = (kinds >= _PUSH) & (kinds <= _STALL)
        if groups is not None:
            valid &= groups
        members: dict[RingId, list[int]] = {}
        for g, p, v, r in zip(np.flatnonzero(valid).tolist(), table["pid"][valid].tolist(),
                              table["vm"][valid].tolist(), table["ring"][valid].tolist(),
                              strict=True):
            members.setdefault((p, v, r), []).append(g)
        keys = sorted(members)
        return RingGroups(keys, [members[k] for k in keys], kinds)


def ring_columns(parts: EventColumns, groups: np.ndarray | None = None, *,
                 rings: RingGroups | None = None, starts: np.ndarray | None = None
                 ) -> list[RingCols]:
    """Every ring's events of the block (kinds PUSH..STALL; others are left out), rings in
    (pid, vm, index) order; only those of the ``groups`` (a bool per group) when given.
    ``rings``: ``RingGroups.of(parts.groups, groups)`` when known; ``starts``:
    ``parts.group_starts()`` when known.

    Per ring, its largest group (its vCPU's pushes) is a slice of the group-major columns
    already in time order; the ring's other events (resets, exits, stalls: few) are put
    in between by their time positions. The cost is the ring's events, never the
    block's."""
    rg = RingGroups.of(parts.groups, groups) if rings is None else rings
    if not rg.keys:
        return []
    kinds = rg.kinds
    if parts.gid is None:  # one group: the columns are the ring's, already in time order
        (key,) = rg.keys
        cols = Cols(parts.ts, np.full(parts.n, kinds[0], np.uint8),
                    *(_grouped(parts, name, 0, 0, parts.n) for name in _COLS))
        return [RingCols(key, cols, (_push_times(parts, 0, parts.n), cols.slot, cols.off)
                         if kinds[0] == _PUSH else (cols.ts[:0], cols.slot[:0], cols.off[:0]))]
    gstart = parts.group_starts() if starts is None else starts
    out = []
    for key, gs in zip(rg.keys, rg.members, strict=True):
        gs = [g for g in gs if gstart[g + 1] > gstart[g]]
        if gs:
            out.append(_ring(parts, key, gs, gstart, kinds))
    return out


def _ring(parts: EventColumns, key: RingId, gs: list[int], gstart: np.ndarray,
          kinds: np.ndarray) -> RingCols:
    """One ring's columns from its groups ``gs`` (each with events)."""
    assert parts.order is not None
    order, ts = parts.order, parts.ts
    sizes = [int(gstart[g + 1] - gstart[g]) for g in gs]
    big = gs[int(np.argmax(sizes))]
    a, e = int(gstart[big]), int(gstart[big + 1])
    push_groups = [g for g in gs if kinds[g] == _PUSH]
    small = [g for g in gs if g != big]
    if not small:  # one group: slices of the stored columns
        cols = Cols(np.take(ts, order[a:e]), np.full(e - a, kinds[big], np.uint8),
                    *(_grouped(parts, name, big, a, e) for name in _COLS))
    else:
        sm = np.concatenate([np.arange(gstart[g], gstart[g + 1]) for g in small])
        sg = np.repeat(np.array(small, dtype=np.intp),
                       [int(gstart[g + 1] - gstart[g]) for g in small])
        stp = np.take(order, sm)  # their time positions
        if len(small) > 1:
            srt = np.argsort(stp, kind="stable")
            sm, sg, stp = sm[srt], sg[srt], stp[srt]
        btp = order[a:e]
        at = np.searchsorted(btp, stp) + np.arange(len(stp))  # their places in the ring
        m = (e - a) + len(stp)
        rest = np.ones(m, dtype=bool)
        rest[at] = False

        def merged(bv: np.ndarray, sv: np.ndarray) -> np.ndarray:
            out = np.empty(m, dtype=bv.dtype)
            out[rest] = bv
            out[at] = sv
            return out

        def column(name: str) -> np.ndarray:
            c = parts.const.get(name)
            if c is not None and int(c[big]) == int(c[sg].min()) == int(c[sg].max()):
                return _same(m, c[big])  # one value in all its groups
            return merged(_grouped(parts, name, big, a, e), _column(parts, name, sm, sg))

        kind = np.full(m, kinds[big], np.uint8)
        kind[at] = kinds[sg]
        cols = Cols(np.take(ts, merged(btp, stp)), kind, *(column(name) for name in _COLS))
    if len(push_groups) == 1:
        g = push_groups[0]
        pa, pe = int(gstart[g]), int(gstart[g + 1])
        pushes = (_push_times(parts, pa, pe), _grouped(parts, "slot", g, pa, pe),
                  _grouped(parts, "value", g, pa, pe))
    elif not push_groups:
        pushes = (cols.ts[:0], cols.slot[:0], cols.off[:0])
    else:
        pushes = None
    return RingCols(key, cols, pushes)


def join_ring_cols(parts: list[RingCols], carry: Cols | None = None
                   ) -> tuple[Cols, tuple[np.ndarray, np.ndarray] | None]:
    """One ring's columns of consecutive blocks as one, after the events ``carry`` (the
    ring's events waiting in its causal order), each column copied once; and the slot and
    offset of all their pushes in order when every block has its pushes apart (else
    None)."""
    c = [p.cols for p in parts] if carry is None else [carry, *(p.cols for p in parts)]
    cols = Cols(*(_cat([getattr(x, f) for x in c])
                  for f in ("ts", "kind", "di", "ri", "slot", "off")))
    if any(p.pushes is None for p in parts):
        return cols, None
    ps = [p.pushes[1] for p in parts]  # type: ignore[index]
    po = [p.pushes[2] for p in parts]  # type: ignore[index]
    if carry is not None:
        cp = carry.kind == _PUSH
        ps.insert(0, carry.slot[cp])
        po.insert(0, carry.off[cp])
    return cols, (_cat(ps), np.concatenate(po))


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays one after the other: a broadcast view again when every one with
    values is one of the same value (a per-group constant column, e.g. one memslot: the
    passes over it then cost nothing per event), else a copy."""
    full = [a for a in arrays if len(a)]
    if full and all(a.strides == (0,) for a in full):
        v = full[0][0]
        if all(a[0] == v for a in full[1:]):
            return _same(sum(len(a) for a in full), v)
    return np.concatenate(arrays)


def share_events(parts: EventColumns, groups: np.ndarray,
                 starts: np.ndarray | None = None) -> np.ndarray:
    """The block's events of the ``groups`` (a bool per group) as records: those of
    ``parts.events()``, built for these events alone (a share of the rings builds its
    share, not the block). ``starts``: ``parts.group_starts()`` when known."""
    if parts.gid is None:
        return parts.events() if groups[0] else parts.events()[:0]
    gid, order = parts.gid, parts.order
    assert order is not None
    sel = np.flatnonzero(groups[gid])  # time positions of the share's events
    if len(sel) == parts.n:
        return parts.events()
    ev = parts.template().take(gid[sel])
    ev["ts"] = parts.ts[sel]
    gstart = parts.group_starts() if starts is None else starts
    gm = np.concatenate([np.arange(gstart[g], gstart[g + 1], dtype=np.intp)
                         for g in np.flatnonzero(groups).tolist()] or [sel[:0]])
    at = np.searchsorted(sel, np.take(order, gm))  # their places among the share's
    for name, v in parts.grouped.items():
        ev[name][at] = np.take(v, gm)
    return ev
