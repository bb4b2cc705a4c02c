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

__all__ = ["COLUMN_BATCH", "BlockShare", "RingCols", "block_shares", "join_ring_cols",
           "ring_columns", "ring_keys", "share_events"]

_PUSH, _STALL = int(Kind.PUSH), int(Kind.STALL)
_COLS = ("dirty_index", "reset_index", "slot", "value")
#: Events of consecutive blocks a replay feeds a ring at once: larger steps cost less
#: per event. Each block is split per ring on its own (its arrays stay in cache: split
#: after merging blocks was slower), the rings' columns are then joined.
COLUMN_BATCH = 1 << 17


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


def _grouped(parts: EventColumns, name: str, g: int, a: int, b: int) -> np.ndarray:
    if name in parts.const:
        return np.full(b - a, parts.const[name][g], dtype=parts.const[name].dtype)
    return parts.grouped[name][a:b]


def _column(parts: EventColumns, name: str, idx: np.ndarray, gsel: np.ndarray | None
            ) -> np.ndarray:
    """Column ``name`` at group-major positions ``idx`` (groups ``gsel``)."""
    if name in parts.const:
        c = parts.const[name]
        if gsel is None or int(c.min()) == int(c.max()):
            return np.full(len(idx), c[0], dtype=c.dtype)
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


def ring_columns(parts: EventColumns, groups: np.ndarray | None = None) -> list[RingCols]:
    """Every ring's events of the block (kinds PUSH..STALL; others are left out), rings in
    (pid, vm, index) order; only those of the ``groups`` (a bool per group) when given."""
    table = parts.groups
    kinds = table["kind"].astype(np.intp)
    valid = (kinds >= _PUSH) & (kinds <= _STALL)
    if groups is not None:
        valid &= groups
    keys = [k for k, _ in ring_keys(table[valid])]
    if not keys:
        return []
    bucket = {k: i for i, k in enumerate(keys)}
    nb = len(keys)
    lut = np.full(len(table), nb, dtype=np.uint8 if nb < 255 else np.uint16)
    for g in np.flatnonzero(valid).tolist():
        lut[g] = bucket[(int(table["pid"][g]), int(table["vm"][g]), int(table["ring"][g]))]
    if parts.gid is None:
        gstart = np.array([0, parts.n])
    else:  # group g's events: [gstart[g], gstart[g + 1]) of the group-major columns
        gstart = np.concatenate(([0], np.cumsum(np.bincount(parts.gid,
                                                             minlength=len(table)))))
    gcount = np.diff(gstart)
    push_groups: dict[int, list[int]] = {}
    for g in np.flatnonzero(valid & (kinds == _PUSH)).tolist():
        push_groups.setdefault(int(lut[g]), []).append(g)

    if parts.gid is None:  # one group: the columns are the ring's, already in time order
        idx = np.arange(parts.n)
        gsel = None
        cuts = [0, parts.n]
        ts = parts.ts
    else:
        # events per ring bucket, from the groups' counts
        cuts = np.concatenate(([0], np.cumsum(np.bincount(
            lut, weights=gcount, minlength=nb + 1)))).astype(np.intp).tolist()
        m = cuts[nb]
        if nb == 1 and m == parts.n:  # one ring: time order is its order
            sel = np.arange(m)
        elif m == parts.n or groups is None:
            # ring by ring, time order within each (a radix sort of small numbers)
            sel = np.argsort(np.take(lut, parts.gid), kind="stable")[:m]
        else:  # a share of the rings: sort only their events
            lg = np.take(lut, parts.gid)
            pos = np.flatnonzero(lg < nb)
            sel = pos if nb == 1 else pos[np.argsort(lg[pos], kind="stable")]
        inv = np.empty(parts.n, dtype=np.intp)  # time position -> group-major index
        inv[parts.order] = np.arange(parts.n)
        idx = np.take(inv, sel)
        gsel = np.take(parts.gid, sel)
        ts = np.take(parts.ts, sel)
    kind = np.full(len(idx), kinds[0], np.uint8) if gsel is None else \
        np.take(np.ascontiguousarray(table["kind"]), gsel)
    di, ri, slot, off = (_column(parts, name, idx, gsel) for name in _COLS)
    out = []
    for b, key in enumerate(keys):
        x, y = cuts[b], cuts[b + 1]
        if x == y:
            continue
        cols = Cols(ts[x:y], kind[x:y], di[x:y], ri[x:y], slot[x:y], off[x:y])
        pushes = None
        pg = push_groups.get(b, [])
        if len(pg) == 1:
            g = pg[0]
            a, e = int(gstart[g]), int(gstart[g + 1])
            pushes = (_push_times(parts, a, e), _grouped(parts, "slot", g, a, e),
                      _grouped(parts, "value", g, a, e))
        elif not pg:
            pushes = (ts[:0], slot[:0], off[:0])
        out.append(RingCols(key, cols, pushes))
    return out

def join_ring_cols(parts: list[RingCols]) -> RingCols:
    """One ring's columns of consecutive blocks as one (time order kept)."""
    c = [p.cols for p in parts]
    cols = Cols(*(np.concatenate([getattr(x, f) for x in c])
                  for f in ("ts", "kind", "di", "ri", "slot", "off")))
    pushes = None
    if all(p.pushes is not None for p in parts):
        pp = [p.pushes for p in parts]
        times = [PushTimes.of(t) if isinstance(t, np.ndarray) else t for t, _, _ in pp]
        times = [t for t in times if t.n]
        ts = PushTimes(sum(t.n for t in times), times[0].first if times else 0,
                       times[-1].last if times else 0,
                       lambda: np.concatenate([t.make() for t in times]))
        pushes = (ts, np.concatenate([p[1] for p in pp]), np.concatenate([p[2] for p in pp]))
    return RingCols(parts[0].key, cols, pushes)



@dataclass
class BlockShare:
    """The part of one block that a replay of some of the rings needs (what one worker of
    a replay on several cores hands another, pickled): the block's event count and first
    time, the share's groups (its rings' and every RING_SIZE group), its rings' columns
    (a share sent elsewhere without the pushes apart: selected by kind there) and, when
    the replay may have to take the block event by event, the share's events as
    EVENT_DTYPE records."""

    n: int
    t0: int
    groups: np.ndarray
    rings: list[RingCols]
    events: np.ndarray | None


def share_events(parts: EventColumns, groups: np.ndarray) -> np.ndarray:
    """The block's events of the ``groups`` (a bool per group) as records."""
    ev = parts.events()
    if parts.gid is None:
        return ev if groups[0] else ev[:0]
    return ev[groups[parts.gid]]


def block_shares(parts: EventColumns, groups: list[np.ndarray], records: list[bool],
                 sent: list[bool]) -> list[BlockShare]:
    """The block split once for several replays of some of the rings: one share per
    ``groups`` (a bool per group of the block), with its events as records where
    ``records`` says; the shares ``sent`` elsewhere (pickled) leave out the pushes apart
    (their slot, offset and times are in the columns)."""
    rings = ring_columns(parts)
    t = parts.groups
    out = []
    for g, rec, far in zip(groups, records, sent, strict=True):
        keys = {(p, v, r) for p, v, r in zip(t["pid"][g].tolist(), t["vm"][g].tolist(),
                                             t["ring"][g].tolist(), strict=True)}
        mine = []
        for rc in rings:
            if rc.key not in keys:
                continue
            if far and rc.pushes is not None:  # the receiver selects them (fewer bytes)
                rc = RingCols(rc.key, rc.cols, None)
            mine.append(rc)
        out.append(BlockShare(parts.n, int(parts.ts[0]) if parts.n else 0, t[g], mine,
                              share_events(parts, g) if rec else None))
    return out
