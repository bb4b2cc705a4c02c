"""Per-ring columns straight from a source's :class:`~kvmtrace.core.columns.EventColumns`
(a recording's blocks as stored), for :meth:`Replay.feed_columns`.

The columns are group-major (a group is one (pid, tid, vm, ring, kind)). Instead of
building 48-byte ``struct kt_event`` records and splitting them per ring again, the
block's groups are mapped to rings (``struct kvm_dirty_ring``, keyed (pid, vm, vCPU
index)): per ring, its largest group (its vCPU's pushes, a slice of the stored columns
already in time order) and where its few other events go in between
(:class:`RingCols`). The ring's time-ordered columns are built only when read: those of
consecutive blocks are written once, straight into the joined columns a replay feeds
(:func:`join_ring_cols`). The pushes of a ring written by one thread are one group, i.e.
contiguous slices of the stored columns, which the working set reads directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...core.columns import EventColumns
from ...core.events import EVENT_DTYPE, Kind
from ...model.results import RingId
from .bulk import Cols
from .workingset import PushTimes

__all__ = ["COLUMN_BATCH", "RingCols", "RingGroups", "join_ring_cols",
           "ring_columns", "ring_keys", "share_events"]

_PUSH, _STALL = int(Kind.PUSH), int(Kind.STALL)
#: Events of consecutive blocks a replay feeds a ring at once: larger steps cost less
#: per event. Each block is split per ring on its own, the rings' columns of the blocks
#: then written into one (:func:`join_ring_cols`). 2**18: on the 8 M-event stream of
#: tools/bench_parallel.py (blocks of ~65 k events) one core spent 0.66 s against 0.72 s
#: at 2**17 and 0.74 s at 2**19 (min CPU of 8 rounds, alternated); again with the columns
#: written straight into the joined ones: median 0.63 s against 0.69 (2**17), 0.67
#: (2**19), 0.73 (2**20), 8 rounds alternated, shared host.
COLUMN_BATCH = 1 << 18


#: the Cols fields, the columns they come from (ts and kind: the block's times, the
#: groups' kinds), their dtypes (EVENT_DTYPE's)
_FIELDS = ("ts", "kind", "di", "ri", "slot", "off")
_SOURCE = {"di": "dirty_index", "ri": "reset_index", "slot": "slot", "off": "value"}
_COLS = tuple(_SOURCE.values())  # the grouped columns, in the Cols fields' order
_DTYPES = {"ts": EVENT_DTYPE["ts"], "kind": np.dtype(np.uint8),
           **{f: EVENT_DTYPE[name] for f, name in _SOURCE.items()}}
#: the pushes of a ring with none in a block
_NO_PUSHES = (np.zeros(0, _DTYPES["ts"]), np.zeros(0, _DTYPES["slot"]),
              np.zeros(0, _DTYPES["off"]))


class RingCols:
    """One ring's events of a block in time order (:attr:`cols`, built when first read;
    :func:`join_ring_cols` writes those of consecutive blocks straight into the joined
    columns instead), and its pushes (times, slot u32, offset u64) when one group holds
    all of them (else None: select by kind)."""

    def __init__(self, key: RingId, n: int,
                 pushes: tuple[np.ndarray | PushTimes, np.ndarray, np.ndarray] | None
                 ) -> None:
        self.key = key
        self.n = n
        self.pushes = pushes
        self._cols: Cols | None = None

    @property
    def cols(self) -> Cols:
        if self._cols is None:
            self._cols = self._build()
        return self._cols

    def _build(self) -> Cols:
        return Cols(*(_same(self.n, v) if (v := self.const(f)) is not None
                      else self._into(f, np.empty(self.n, _DTYPES[f])) for f in _FIELDS))

    def _into(self, f: str, out: np.ndarray) -> np.ndarray:
        self.write(f, out)
        return out

    def const(self, f: str) -> np.generic | None:
        """The one value of field ``f`` when the ring's column holds one (a per-group
        constant), else None."""
        raise NotImplementedError

    def write(self, f: str, out: np.ndarray) -> None:
        """Field ``f`` of the events into ``out`` (``n`` values)."""
        raise NotImplementedError


class _Built(RingCols):
    """Columns already built."""

    def __init__(self, key: RingId, cols: Cols,
                 pushes: tuple[np.ndarray | PushTimes, np.ndarray, np.ndarray] | None
                 ) -> None:
        super().__init__(key, len(cols), pushes)
        self._cols = cols

    def const(self, f: str) -> np.generic | None:
        c = getattr(self.cols, f)
        return c[0] if c.strides == (0,) and len(c) else None

    def write(self, f: str, out: np.ndarray) -> None:
        out[:] = getattr(self.cols, f)


class _Slice(RingCols):
    """A ring whose events are one group's, group-major positions a..e: slices of the
    stored columns (ts gathered)."""

    def __init__(self, key: RingId, parts: EventColumns, g: int, a: int, e: int,
                 kind: int, pushes: tuple[np.ndarray | PushTimes, np.ndarray, np.ndarray]
                 ) -> None:
        super().__init__(key, e - a, pushes)
        self.parts, self.g, self.a, self.e, self.kind = parts, g, a, e, kind

    def _build(self) -> Cols:
        parts, g, a, e = self.parts, self.g, self.a, self.e
        assert parts.order is not None
        return Cols(np.take(parts.ts, parts.order[a:e]), np.full(e - a, self.kind, np.uint8),
                    *(_grouped(parts, _SOURCE[f], g, a, e) for f in _FIELDS[2:]))

    def const(self, f: str) -> np.generic | None:
        c = self.parts.const.get(_SOURCE.get(f, ""))
        return None if c is None else c[self.g]

    def write(self, f: str, out: np.ndarray) -> None:
        parts, a, e = self.parts, self.a, self.e
        if f == "ts":
            assert parts.order is not None
            np.take(parts.ts, parts.order[a:e], out=out, mode="clip")  # in range
        elif f == "kind":
            out.fill(self.kind)
        else:
            name = _SOURCE[f]
            c = parts.const.get(name)
            if c is not None:
                out.fill(c[self.g])
            else:
                out[:] = parts.grouped[name][a:e]


class _Merged(RingCols):
    """A ring's largest group (group-major a..e: its vCPU's pushes, in time order) with
    its few other events (group-major positions ``sm``, groups ``sg``, time positions
    ``stp``, ascending) put in between: at positions ``at`` of the ring's events."""

    def __init__(self, key: RingId, parts: EventColumns, big: int, a: int, e: int,
                 sm: np.ndarray, sg: np.ndarray, stp: np.ndarray, kinds: np.ndarray,
                 pushes: tuple[np.ndarray | PushTimes, np.ndarray, np.ndarray] | None
                 ) -> None:
        assert parts.order is not None
        btp = parts.order[a:e]
        at = np.searchsorted(btp, stp) + np.arange(len(stp))  # their places in the ring
        super().__init__(key, (e - a) + len(stp), pushes)
        self.parts, self.big, self.a, self.e = parts, big, a, e
        self.sm, self.sg, self.stp, self.kinds, self.at = sm, sg, stp, kinds, at
        self.rest = np.ones(self.n, dtype=bool)
        self.rest[at] = False

    def _merge(self, bv: np.ndarray, sv: np.ndarray, out: np.ndarray) -> np.ndarray:
        out[self.rest] = bv
        out[self.at] = sv
        return out

    def const(self, f: str) -> np.generic | None:
        c = self.parts.const.get(_SOURCE.get(f, ""))
        if c is not None and int(c[self.big]) == int(c[self.sg].min()) == int(
                c[self.sg].max()):
            return c[self.big]  # one value in all its groups
        return None

    def write(self, f: str, out: np.ndarray) -> None:
        parts, a, e = self.parts, self.a, self.e
        if f == "ts":
            assert parts.order is not None
            tp = self._merge(parts.order[a:e], self.stp, np.empty(self.n, np.intp))
            np.take(parts.ts, tp, out=out, mode="clip")  # in range
        elif f == "kind":
            out.fill(self.kinds[self.big])
            out[self.at] = self.kinds[self.sg]
        else:
            name = _SOURCE[f]
            self._merge(_grouped(parts, name, self.big, a, e),
                        _column(parts, name, self.sm, self.sg), out)


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
    (a per-group constant column, e.g. one memslot, costs no memory per event). Made
    as np.broadcast_to makes it, in a seventh of its time (it is made per ring and
    block)."""
    one = np.array(value)
    view = np.ndarray((n,), one.dtype, one, 0, (0,))
    view.flags.writeable = False
    return view


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
        return [_Built(key, cols, (_push_times(parts, 0, parts.n), cols.slot, cols.off)
                       if kinds[0] == _PUSH else _NO_PUSHES)]
    gstart = parts.group_starts() if starts is None else starts
    out = []
    for key, gs in zip(rg.keys, rg.members, strict=True):
        gs = [g for g in gs if gstart[g + 1] > gstart[g]]
        if gs:
            out.append(_ring(parts, key, gs, gstart, kinds))
    return out


def _ring(parts: EventColumns, key: RingId, gs: list[int], gstart: np.ndarray,
          kinds: np.ndarray) -> RingCols:
    """One ring's columns from its groups ``gs`` (each with events), not yet built."""
    assert parts.order is not None
    order = parts.order
    sizes = [int(gstart[g + 1] - gstart[g]) for g in gs]
    big = gs[max(range(len(gs)), key=sizes.__getitem__)]  # the first largest
    a, e = int(gstart[big]), int(gstart[big + 1])
    push_groups = [g for g in gs if kinds[g] == _PUSH]
    small = [g for g in gs if g != big]
    if len(push_groups) == 1:
        g = push_groups[0]
        pa, pe = int(gstart[g]), int(gstart[g + 1])
        pushes = (_push_times(parts, pa, pe), _grouped(parts, "slot", g, pa, pe),
                  _grouped(parts, "value", g, pa, pe))
    else:
        pushes = None
    if not small:  # one group: slices of the stored columns
        if not push_groups:
            pushes = _NO_PUSHES
        return _Slice(key, parts, big, a, e, int(kinds[big]), pushes)  # type: ignore[arg-type]
    sm = np.concatenate([np.arange(gstart[g], gstart[g + 1]) for g in small])
    sg = np.repeat(np.array(small, dtype=np.intp),
                   [int(gstart[g + 1] - gstart[g]) for g in small])
    stp = np.take(order, sm)  # their time positions
    if len(small) > 1:
        srt = np.argsort(stp, kind="stable")
        sm, sg, stp = sm[srt], sg[srt], stp[srt]
    if not push_groups:
        pushes = _NO_PUSHES
    return _Merged(key, parts, big, a, e, sm, sg, stp, kinds, pushes)


def join_ring_cols(parts: list[RingCols], carry: Cols | None = None
                   ) -> tuple[Cols, tuple[np.ndarray, np.ndarray] | None]:
    """One ring's columns of consecutive blocks as one, after the events ``carry`` (the
    ring's events waiting in its causal order), each block's written once, straight into
    the joined columns; and the slot and offset of all their pushes in order when every
    block has its pushes apart (else None)."""
    cols = Cols(*(_joined(f, parts, carry) for f in _FIELDS))
    if any(p.pushes is None for p in parts):
        return cols, None
    ps = [p.pushes[1] for p in parts]  # type: ignore[index]
    po = [p.pushes[2] for p in parts]  # type: ignore[index]
    if carry is not None:
        cp = carry.kind == _PUSH
        ps.insert(0, carry.slot[cp])
        po.insert(0, carry.off[cp])
    return cols, (_cat(ps), np.concatenate(po))


def _joined(f: str, parts: list[RingCols], carry: Cols | None) -> np.ndarray:
    """Field ``f`` of ``carry`` then of the blocks' ``parts``: a broadcast view when each
    one with events holds one same value (see :func:`_cat`), else written into one
    array."""
    head = getattr(carry, f) if carry is not None else None
    values = [p.const(f) for p in parts if p.n]
    one = values[0] if values and all(
        v is not None and v == values[0] for v in values) else None
    if head is not None and len(head):
        if head.strides == (0,):
            at_head = head[0]
        elif one is not None and bool((head == one).all()):
            at_head = one  # e.g. the held events of a ring fed as records: one value too
        else:
            at_head = None
        one = at_head if not values else (one if at_head is not None and at_head == one
                                          else None)
    total = sum(p.n for p in parts) + (len(head) if head is not None else 0)
    if one is not None:
        return _same(total, one)
    out = np.empty(total, _DTYPES[f])
    pos = 0
    if head is not None:
        out[:len(head)] = head
        pos = len(head)
    for p in parts:
        p.write(f, out[pos:pos + p.n])
        pos += p.n
    return out


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
