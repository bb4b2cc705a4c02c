"""Replay: rebuild every dirty ring (``struct kvm_dirty_ring``) of an event stream over time.

Works on any :class:`~kvmtrace.core.sources.EventSource` (recording, imported ftrace or
``perf script`` text, live). Per ring it checks the stream against the kernel's rules and
reports anomalies (see :mod:`kvmtrace.testing.reference`, whose semantics this follows
exactly, vectorised per ring and per batch: :mod:`.bulk`, :mod:`.ringstate`; each
ring's events first put in causal order, :mod:`.order`), totals,
the multiset digest of harvested (slot, offset) entries, dirty rate and working set per
vCPU (:mod:`.workingset`), and optionally the exits another ring size would have caused
(:mod:`.simulate`). State is bounded: per ring, its entries (at most 65536) and counters.
A source with columns (:class:`~kvmtrace.core.columns.EventColumns`: a recording's blocks
as stored) is read column by column (:meth:`Replay.feed_columns`, :mod:`.colfeed`),
without building 48-byte records; both ways give the same report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ...core.columns import EventColumns
from ...core.counters import VmName
from ...core.events import Kind
from ...core.kvm_abi import KVM_DIRTY_RING_RSVD_ENTRIES
from ...core.sources import EventSource, SourceMeta
from ...model.results import Anomaly, RingId, RingResult
from ...model.ring import resets_interruptible
from ...model.sizes import RingSizes
from .bulk import Cols, feed_ring
from .colfeed import (
    COLUMN_BATCH,
    RingCols,
    RingGroups,
    join_ring_cols,
    ring_columns,
    ring_keys,
    share_events,
)
from .order import RingOrder, order_segment
from .ringstate import FastRing
from .simulate import RingSizeSim, SimResult
from .workingset import HotPage, RingWs, WorkingSet

__all__ = ["Replay", "ReplayReport", "ReplayTap", "SharedTap", "replay_source"]

_PUSH, _RESET, _EXIT = int(Kind.PUSH), int(Kind.RESET), int(Kind.EXIT)
_EMPTY = Cols(np.zeros(0, np.uint64), np.zeros(0, np.uint8), np.zeros(0, np.uint32),
              np.zeros(0, np.uint32), np.zeros(0, np.uint32), np.zeros(0, np.uint64))


@dataclass
class ReplayReport:
    source_kind: str
    events: int
    lost: int
    reserved: int
    rings: list[RingResult]
    anomalies: list[Anomaly]
    window_ns: int
    #: per ring, in (pid, vm, index) order as ``rings``
    workingset: dict[RingId, RingWs] = field(default_factory=dict)
    hottest: dict[tuple[int, int], list[HotPage]] = field(default_factory=dict)
    simulation: SimResult | None = None
    harvested: dict[RingId, list[tuple[int, int]]] | None = None
    #: (pid, vm) of the rings and of the meta's named VMs -> VMM kind, name, comm from the
    #: source's meta (recordings of format 1.2 on); empty when the source carries no names
    vms: dict[tuple[int, int], VmName] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.anomalies and not self.lost

    @property
    def exit_status(self) -> int:
        """0 clean, 1 anomalies (or lost events: the producer dropped some)."""
        return 0 if self.clean else 1


@dataclass(frozen=True)
class _TableInfo:
    """A block's group table as :meth:`Replay.feed_columns` reads it: the groups of the
    replay's rings (None: all) and their table, whether a RING_SIZE group is among them,
    the (pid, vm) of their soft-full exits, their rings (:func:`~.colfeed.ring_keys`)."""

    mine: np.ndarray | None
    table: np.ndarray
    ring_size: bool
    exit_vms: tuple[tuple[int, int], ...]
    keys: list[tuple[RingId, bool]]
    rings: RingGroups


class Replay:
    """Feed EVENT_DTYPE batches in time order with :meth:`feed` (or EventColumns with
    :meth:`feed_columns`; the two may be mixed), then :meth:`finish`.

    ``meta`` supplies ring sizes the events do not carry; ``reserved`` is the kernel's
    reserve (64; 576 on Intel hosts with PML); ``keep_harvest`` keeps every harvested
    entry (memory grows with the trace) for ``--dump-harvest``.
    """

    def __init__(self, meta: SourceMeta | None = None, *,
                 reserved: int = KVM_DIRTY_RING_RSVD_ENTRIES, keep_harvest: bool = False,
                 window_ns: int = 1_000_000_000, simulate_entries: int | None = None,
                 pages: bool = True, owns: Callable[[int, int, int], bool] | None = None
                 ) -> None:
        self.meta = meta or SourceMeta(kind="unknown")
        self.reserved = reserved
        self.keep = keep_harvest
        self.rings: dict[RingId, FastRing] = {}
        self.sizes = RingSizes(self.meta, reserved)
        self.events = 0
        self.ws = WorkingSet(window_ns) if pages else None
        self.sim = RingSizeSim(simulate_entries, reserved) if simulate_entries else None
        # feed_columns: per ring, columns of consecutive blocks fed together (fewer,
        # larger steps; bounded by COLUMN_BATCH events)
        self._pending: dict[RingId, list[RingCols]] = {}
        self._npending = 0
        self._order: dict[RingId, RingOrder] = {}
        self._eintr = resets_interruptible(self.meta.kernel_release)
        #: a share of the rings (:mod:`.parallel`): (pid, vm, index) -> this replay's?
        #: Events of other rings are counted and skipped; RING_SIZE events are kept.
        self.owns = owns
        self._tables: dict[bytes, _TableInfo] = {}

    # -- sizes ------------------------------------------------------------------------
    def _ring(self, key: RingId) -> FastRing:
        r = self.rings.get(key)
        if r is None:
            size, source = self.sizes.size(key[0], key[1])
            r = self.rings[key] = FastRing(key, size, source, self.reserved, self.keep,
                                           self._eintr)
            self._order[key] = RingOrder()
        return r

    def _feed_ring(self, key: RingId, c: Cols, drain: bool = False,
                   pushes: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """One ring's events in trace order through the causal order into the model.
        ``pushes``: slot and offset of ``c``'s pushes alone (see :func:`feed_ring`)."""
        ro = self._order[key]
        carry = ro.carry
        out = order_segment(ro, c, drain)
        if out is None:
            return
        if pushes is not None and ro.identity:  # the carried pushes, then c's first ones
            ps, po = pushes
            if carry is not None and len(carry):
                cp = carry.kind == _PUSH
                ps = np.concatenate((carry.slot[cp], ps))
                po = np.concatenate((carry.off[cp], po))
            kept = ro.carry  # out is the events before it: their pushes are ps's first
            m = len(ps) - (int(np.count_nonzero(kept.kind == _PUSH))
                           if kept is not None and len(kept) else 0)
            feed_ring(self.rings[key], out, (ps[:m], po[:m]))
        else:
            feed_ring(self.rings[key], out)

    def _drain_vm(self, pid: int, vm: int) -> None:
        """Hand every waiting event of the VM's rings to the model (a barrier)."""
        for key, ro in self._order.items():
            if key[:2] == (pid, vm) and ro.carry is not None:
                self._feed_ring(key, _EMPTY, drain=True)

    def _resize_vm(self, pid: int, vm: int, ts: int) -> None:
        """The VM's rings take its size (and source) now in :attr:`sizes`."""
        size, source = self.sizes.size(pid, vm)
        assert size is not None
        for key, r in self.rings.items():
            if key[:2] == (pid, vm) and r.res.size != size:
                r.set_size(size, source, ts)

    # -- feeding ----------------------------------------------------------------------
    def feed(self, ev: np.ndarray) -> None:
        self._feed(ev)

    def _feed(self, ev: np.ndarray, of: int | None = None, t0: int | None = None) -> None:
        """``of``: ``ev`` is this share's part (:attr:`owns`) of that many events, the
        first at ``t0``."""
        if of is None:
            if not len(ev):
                return
            of, t0 = len(ev), int(ev["ts"][0])
            if self.owns is not None:
                ev = self._mine(ev)
        self._flush_columns()
        self.events += of
        if self.ws is not None and self.ws.t0 is None:
            self.ws.t0 = t0  # windows count from the trace's first event
        n = len(ev)
        if not n:
            return
        if self.sim is not None:
            self.sim.feed(ev)
        # Contiguous columns once per batch: numpy ops and gathers on the 48-byte
        # structured records' fields are several times slower than on plain columns.
        cols = Cols(np.ascontiguousarray(ev["ts"]), np.ascontiguousarray(ev["kind"]),
                    np.ascontiguousarray(ev["dirty_index"]),
                    np.ascontiguousarray(ev["reset_index"]),
                    np.ascontiguousarray(ev["slot"]), np.ascontiguousarray(ev["value"]))
        ring = np.ascontiguousarray(ev["ring"])
        pid, vm = ev["pid"], ev["vm"]
        one_vm = bool((pid == pid[0]).all() and (vm == vm[0]).all())
        pos = 0
        for b in self._barriers(ev, cols.kind):
            if b > pos:
                self._segment(ev, cols, ring, one_vm, pos, b)
            self._barrier(ev[b])
            pos = b + 1
        if pos < n:
            self._segment(ev, cols, ring, one_vm, pos, n)

    def _mine(self, ev: np.ndarray) -> np.ndarray:
        """The events of :attr:`owns`'s rings and every RING_SIZE event."""
        assert self.owns is not None
        keys = np.stack([ev["pid"].astype(np.int64), ev["vm"].astype(np.int64),
                         ev["ring"].astype(np.int64)], 1)
        uk, inv = np.unique(keys, axis=0, return_inverse=True)
        ok = np.array([self.owns(*k) for k in uk.tolist()], dtype=bool)
        return ev[ok[inv.ravel()] | (ev["kind"] == Kind.RING_SIZE)]

    def _mine_groups(self, table: np.ndarray) -> np.ndarray | None:
        """Which groups of a block's table are :attr:`owns`'s (None: all)."""
        if self.owns is None:
            return None
        owns = self.owns
        return np.array([k == Kind.RING_SIZE or owns(p, v, r) for p, v, r, k in zip(
            table["pid"].tolist(), table["vm"].tolist(), table["ring"].tolist(),
            table["kind"].tolist(), strict=True)], dtype=bool)

    def feed_columns(self, parts: EventColumns, starts: np.ndarray | None = None) -> None:
        """As :meth:`feed` for events as columns (a source's ``column_batches()``, e.g. a
        recording's blocks as stored; see :mod:`.colfeed`); the same report, without
        building EVENT_DTYPE records. Blocks
        with events taken one by one (ring sizes, exits of VMs of unknown size) and
        ``simulate_entries`` go through :meth:`feed`. ``starts``:
        ``parts.group_starts()`` when known."""
        if not parts.n:
            return
        info = self._table_info(parts.groups)
        mine, t = info.mine, info.table
        if self.sim is not None or info.ring_size or any(
                not self.sizes.known(p, v) for p, v in info.exit_vms):
            ev = parts.events()
            if mine is None:
                self.feed(ev)
                return
            self._feed(share_events(parts, mine, starts), parts.n, int(parts.ts[0]))
            return
        self._take_columns(parts.n, int(parts.ts[0]), t, ring_columns(
            parts, mine, rings=info.rings, starts=starts), info.keys)

    def _table_info(self, table: np.ndarray) -> _TableInfo:
        """What :meth:`feed_columns` reads from a block's group table, once per distinct
        table (consecutive blocks of a recording mostly have the same groups)."""
        raw = table.tobytes()
        info = self._tables.get(raw)
        if info is None:
            if len(self._tables) >= 256:
                self._tables.clear()
            mine = self._mine_groups(table)
            t = table if mine is None else table[mine]
            kinds = t["kind"]
            x = kinds == _EXIT
            info = self._tables[raw] = _TableInfo(
                mine, t, bool((kinds == Kind.RING_SIZE).any()),
                tuple(sorted(set(zip(t["pid"][x].tolist(), t["vm"][x].tolist(),
                                     strict=True)))), ring_keys(t),
                RingGroups.of(table, mine))
        return info

    @property
    def holds_columns(self) -> bool:
        """Whether columns fed with :meth:`feed_columns` are still referenced (pending,
        not yet handed to the rings): a replay on every core reuses a block's shared
        memory once no worker holds it (:mod:`.parallel`)."""
        return bool(self._pending)

    def _take_columns(self, n: int, t0: int, t: np.ndarray, rcs: list[RingCols],
                      keys: list[tuple[RingId, bool]] | None = None) -> None:
        self.events += n
        if self.ws is not None and self.ws.t0 is None:
            self.ws.t0 = t0
        for key, has_pushes in ring_keys(t) if keys is None else keys:
            self._ring(key)  # rings and their working sets in order of appearance
            if self.ws is not None and has_pushes:
                self.ws.ring(key)
        for rc in rcs:
            self._pending.setdefault(rc.key, []).append(rc)
        self._npending += n
        if self._npending >= COLUMN_BATCH:
            self._flush_columns()

    def _flush_columns(self) -> None:
        pending, self._pending, self._npending = self._pending, {}, 0
        for key, parts in pending.items():
            ro = self._order[key]
            if len(parts) == 1 and (ro.carry is None or not len(ro.carry)):
                rc = parts[0]
                self._feed_ring(key, rc.cols, pushes=None if rc.pushes is None
                                else (rc.pushes[1], rc.pushes[2]))
            else:  # the waiting events and the blocks' joined in one copy
                cols, pushes = join_ring_cols(parts, ro.carry if ro.carry is not None
                                              and len(ro.carry) else None)
                ro.carry = None
                self._feed_ring(key, cols, pushes=pushes)
            if self.ws is None:
                continue
            for rc in parts:  # block by block: the working set streams
                if rc.pushes is not None:
                    self.ws.add(key, *rc.pushes)
                else:
                    g = rc.cols
                    p = g.kind == _PUSH
                    self.ws.add(key, g.ts[p], g.slot[p], g.off[p])

    def _barriers(self, ev: np.ndarray, kind: np.ndarray) -> list[int]:
        """Events to take one by one, in order: ring sizes, and soft-full exits of VMs
        whose size is still unknown (the first one infers it for the whole VM)."""
        out = np.flatnonzero(kind == Kind.RING_SIZE).tolist()
        xs = np.flatnonzero(kind == _EXIT)
        if len(xs):
            pv = zip(ev["pid"][xs].tolist(), ev["vm"][xs].tolist(), strict=True)
            unknown = {k for k in set(pv) if not self.sizes.known(*k)}
            if unknown:
                out += [int(x) for x in xs
                        if (int(ev["pid"][x]), int(ev["vm"][x])) in unknown]
        return sorted(out)

    def _barrier(self, e: np.void) -> None:
        pid, vm, ts = int(e["pid"]), int(e["vm"]), int(e["ts"])
        if int(e["kind"]) == Kind.RING_SIZE:
            self._drain_vm(pid, vm)
            if self.sizes.from_event(pid, vm, int(e["value"])) is not None:
                self._resize_vm(pid, vm, ts)
            return
        key = (pid, vm, int(e["ring"]))
        r = self._ring(key)
        one = Cols(*(np.array([e[f]]) for f in ("ts", "kind", "dirty_index", "reset_index",
                                                 "slot", "value")))
        unknown = not self.sizes.known(pid, vm)
        if unknown:  # the VM's first soft-full exit tells its ring size
            self._drain_vm(pid, vm)
            if r.started:
                mx = max(x.res.max_used for k, x in self.rings.items() if k[:2] == (pid, vm))
                if self.sizes.infer(pid, vm, r.used(), mx) is not None:
                    self._resize_vm(pid, vm, ts)
        self._feed_ring(key, one, drain=unknown)

    def _segment(self, ev: np.ndarray, cols: Cols, ring: np.ndarray, one_vm: bool, a: int,
                 b: int) -> None:
        """Events a..b of a batch (no barrier among them), ring by ring."""
        c = cols if (a, b) == (0, len(cols)) else cols.slice(a, b)
        kind = c.kind
        valid = None
        if int(kind.max()) > Kind.STALL or int(kind.min()) < _PUSH:
            valid = (kind >= _PUSH) & (kind <= Kind.STALL)
            if not valid.any():
                return
        if one_vm:
            groups = self._groups_one_vm(int(ev["pid"][0]), int(ev["vm"][0]), ring[a:b],
                                         valid)
        else:
            groups = self._groups(ev[a:b], valid)
        for key, sel in groups:
            g = c if sel is None else c.take(sel)
            self._ring(key)
            self._feed_ring(key, g)
            if self.ws is not None:
                p = g.kind == _PUSH
                if p.all():
                    self.ws.add(key, g.ts, g.slot, g.off)
                else:
                    self.ws.add(key, g.ts[p], g.slot[p], g.off[p])

    @staticmethod
    def _groups_one_vm(pid: int, vm: int, ring: np.ndarray, valid: np.ndarray | None
                       ) -> list[tuple[RingId, np.ndarray | None]]:
        """As :meth:`_groups` for events of one VM (``ring``: contiguous ring indices)."""
        rv = ring if valid is None else ring[valid]
        lo, hi = int(rv.min()), int(rv.max())
        if lo == hi:
            return [((pid, vm, lo), None if valid is None else np.flatnonzero(valid))]
        if hi - lo >= 64:
            idx = np.arange(len(ring)) if valid is None else np.flatnonzero(valid)
            order = np.argsort(rv, kind="stable")
            rs = rv[order]
            cuts = np.flatnonzero(rs[1:] != rs[:-1]) + 1
            return [((pid, vm, int(rs[x])), idx[order[x:y]])
                    for x, y in zip([0, *cuts.tolist()], [*cuts.tolist(), len(rs)],
                                    strict=True)]
        out: list[tuple[RingId, np.ndarray | None]] = []
        for r in range(lo, hi + 1):
            m = ring == r
            if valid is not None:
                m &= valid
            sel = np.flatnonzero(m)
            if len(sel):
                out.append(((pid, vm, r), sel))
        return out

    @staticmethod
    def _groups(ev: np.ndarray, valid: np.ndarray | None
                ) -> list[tuple[RingId, np.ndarray | None]]:
        """(ring, indices of its events in ``ev``) per ring, over the events ``valid``
        selects (all when None), rings in (pid, vm, index) order."""
        pid, vm, ring = ev["pid"], ev["vm"], ev["ring"]
        idx = np.arange(len(ev)) if valid is None else np.flatnonzero(valid)
        keys = np.stack([pid[idx].astype(np.int64), vm[idx].astype(np.int64),
                         ring[idx].astype(np.int64)], 1)
        uk, inv = np.unique(keys, axis=0, return_inverse=True)
        inv = inv.ravel()
        order = np.argsort(inv, kind="stable")
        cuts = np.searchsorted(inv[order], np.arange(len(uk) + 1))
        return [((int(k[0]), int(k[1]), int(k[2])), idx[order[cuts[i]:cuts[i + 1]]])
                for i, k in enumerate(uk.tolist())]

    # -- results ----------------------------------------------------------------------
    def finish(self, lost: int = 0, source_kind: str | None = None, *,
               hottest: bool = True) -> ReplayReport:
        """The report. ``hottest``: False leaves its hottest pages out (a share of the
        rings, :mod:`.parallel`: they are chosen once the shares' counts are merged)."""
        self._flush_columns()
        for key in self.rings:
            self._feed_ring(key, _EMPTY, drain=True)
        anomalies: list[Anomaly] = []
        for r in self.rings.values():
            r.finish()
            anomalies.extend(r.anomalies)
        anomalies.sort(key=lambda a: (a.time_ns, a.ring, a.kind.value))
        keys = sorted(self.rings)
        report = ReplayReport(
            source_kind=source_kind or self.meta.kind,
            events=self.events,
            lost=lost,
            reserved=self.reserved,
            rings=[self.rings[k].res for k in keys],
            anomalies=anomalies,
            window_ns=self.ws.window_ns if self.ws else 0,
        )
        for pid, vm in sorted({k[:2] for k in keys} | set(self.meta.vms)):
            who = self.meta.vm_name(pid, vm)  # also VMs with no ring event (none pushed)
            if who is not None:
                report.vms[(pid, vm)] = who
        if self.ws is not None:
            self.ws.finish()
            report.workingset = {k: self.ws.rings[k] for k in sorted(self.ws.rings)}
            report.hottest = self.ws.hottest() if hottest else {}
        if self.sim is not None:
            report.simulation = self.sim.finish(keys, self._mean_stalls())
        if self.keep:
            report.harvested = {k: self.rings[k].harvested() for k in keys}
        return report

    def _mean_stalls(self) -> dict[tuple[int, int], float | None]:
        acc: dict[tuple[int, int], list[int]] = {}
        for key, r in self.rings.items():
            d = r.res.stalls if r.res.stalls.count else r.res.exit_to_push
            a = acc.setdefault(key[:2], [0, 0])
            a[0] += d.total_ns
            a[1] += d.count
        return {k: (t / c if c else None) for k, (t, c) in acc.items()}


class ReplayTap(Protocol):
    """Sees every block a replay reads, as it reads it (one pass over the file for the
    replay and what else wants the events, e.g. kvmtrace.analysis.migration)."""

    def columns(self, cols: EventColumns) -> None: ...

    def batch(self, batch: np.ndarray) -> None: ...


@runtime_checkable
class SharedTap(Protocol):
    """A :class:`ReplayTap` a replay on several cores (:mod:`.parallel`) can split by
    block: each worker fills a :meth:`share` with some blocks' columns, and :meth:`join`
    takes them back (each with the numbers of its blocks) as if it had seen every block
    in order."""

    def columns(self, cols: EventColumns) -> None: ...

    def batch(self, batch: np.ndarray) -> None: ...

    def share(self) -> SharedTap: ...

    def join(self, shares: list[tuple[list[int], SharedTap]]) -> None: ...


def replay_source(source: EventSource, tap: ReplayTap | None = None, *,
                  jobs: int | None = 1,
                  min_events: int | None = None,
                  on_block: Callable[[int], None] | None = None,
                  **options: object) -> ReplayReport:
    """Replay a whole source; ``options`` as for :class:`Replay`; ``tap`` sees each block
    (as columns where the source has them, else as EVENT_DTYPE batches). ``jobs`` > 1:
    spread the rings over that many processes (:mod:`.parallel`; the same report), None:
    over the idle CPUs (:func:`.parallel.default_jobs`, asked only then), when
    the source has blocks and at least ``min_events`` events (default
    :data:`.parallel.MIN_EVENTS`; 0: always), else one process. ``on_block(events)``:
    called after each block the processes replayed (progress; one process counts through
    the source it reads, e.g. a progress-counting wrapper)."""
    if jobs is None or jobs > 1:
        from .parallel import MIN_EVENTS, replay_parallel

        rep = replay_parallel(source, jobs, tap,  # type: ignore[arg-type]
                              min_events=MIN_EVENTS if min_events is None else min_events,
                              on_block=on_block, **options)
        if rep is not None:
            return rep
    rp = Replay(source.meta, **options)  # type: ignore[arg-type]
    columns = source.column_batches() if rp.sim is None else None
    if columns is not None:
        for parts in columns:
            rp.feed_columns(parts)
            if tap is not None:
                tap.columns(parts)
    else:
        for batch in source.batches():
            rp.feed(batch)
            if tap is not None:
                tap.batch(batch)
    return rp.finish(lost=source.lost, source_kind=source.meta.kind)
