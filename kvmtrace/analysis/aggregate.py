"""Per-ring counters computed in user space from any event stream.

:class:`Aggregator` turns :data:`~kvmtrace.core.events.EVENT_DTYPE` batches into the same
cumulative :class:`~kvmtrace.core.counters.Snapshot` counters the in-kernel BPF maps keep,
so ``top`` runs over a recording or an imported ftrace/``perf script`` text exactly as over
the live kernel. :class:`ReplaySource` wraps an EventSource as a SnapshotSource that moves
through the file's time by a fixed step per :meth:`~ReplaySource.snapshot` call
(:class:`StepClock`; :mod:`.spread_snapshots` spreads its rings over processes).

The counters are computed on columns (:class:`~kvmtrace.core.columns.EventColumns`: a
recording's blocks as stored, group-major) without building 48-byte records: per group
(pid, tid, vm, ring, kind) of a block, the events of a time window are one slice, and a
ring's counters are reductions over the slices of its groups. Record batches (text
traces) are put in that form first (:func:`record_columns`).

Semantics (per ring = ``struct kvm_dirty_ring`` of one vCPU, keyed by (pid, vm fd, index)):

- ``pushes``: kvm_dirty_ring_push events; ``soft_full_exits``: kvm_dirty_ring_exit events;
  ``resets``: kvm_dirty_ring_reset events (one per ring per KVM_RESET_DIRTY_RINGS ioctl).
- ``entries_reset``: how far the ring's ``reset_index`` advanced (u32 arithmetic) from its
  first push/reset event to the furthest value any later push or reset event carried: the
  sum of every KVM_RESET_DIRTY_RINGS's advance, as the replay counts it. A push also
  carries ``reset_index``, and with a harvester running beside the vCPU a push that read a
  reset's new ``reset_index`` may come before that reset's event in the trace (the reset
  then shows no advance of its own); counting only at reset events undercounted such runs
  by a quarter. Values behind the furthest one (a stale read) count nothing. A ring's
  first event sets the start: entries reset before it are unknown.
- ``dirty_index``/``reset_index``: the furthest seen on a push or reset event (a reset's
  ``dirty_index`` is read while the vCPU may still push); ``max_used``: the largest
  ``dirty_index - reset_index`` of one push or reset event, in entries.
- ``lost``: overwritten entries, pushes that left ``used > size`` (the entry overwrote an
  unharvested one); only counted while the ring size is known.
- ``stall_hist``/``stall_ns``: KT_STALL durations in ns.
- per VM (:class:`~kvmtrace.core.counters.VmCounters`, like the in-kernel ``vms`` map):
  ``reset_ioctls``, ``reset_ns`` and ``reset_lat_hist`` from KT_RESET_LAT events (one per
  KVM_RESET_DIRTY_RINGS vm ioctl, duration in ns; their ring field is -1 on disk).
- ring ``size`` (entries of 16-byte ``struct kvm_dirty_gfn``): from KT_RING_SIZE events
  (``value`` = ring bytes, per VM), else from :meth:`SourceMeta.ring_size`, else None
  (:class:`~kvmtrace.model.sizes.RingSizes`, without inference).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from ..core.columns import COLUMN_FIELDS, GROUP_FIELDS, EventColumns
from ..core.counters import HIST_BUCKETS, RingCounters, RingKey, Snapshot, VmCounters, VmInfo, VmKey
from ..core.events import EVENT_DTYPE, Kind
from ..core.kvm_abi import u32
from ..core.sources import EventSource, SnapshotSource, SourceMeta
from ..model.sizes import RingSizes

__all__ = ["Aggregator", "Changes", "ReplaySource", "StepClock", "log2_buckets",
           "record_columns"]

# 2**1 .. 2**(HIST_BUCKETS-1): searchsorted(side="right") gives floor(log2 v) for v >= 1.
_POW2 = np.array([1 << i for i in range(1, HIST_BUCKETS)], dtype=np.uint64)
_PUSH, _RESET, _EXIT, _STALL = int(Kind.PUSH), int(Kind.RESET), int(Kind.EXIT), int(Kind.STALL)
_RESET_LAT, _RING_SIZE = int(Kind.RESET_LAT), int(Kind.RING_SIZE)
_PER_VM = (_RESET_LAT, _RING_SIZE)

Span = tuple[int, int, int]  # (group, start, end): group-major positions of a group's events
#: counts a ring's events: (pid, vm, ring index) -> True (a worker's share of the rings)
Owns = Callable[[tuple[int, int, int]], bool]
#: what changed since the last :meth:`Aggregator.take_changes`: rings, VMs (all of them,
#: or None if none changed), VM counters
Changes = tuple[dict[RingKey, RingCounters], dict[tuple[int, int], VmInfo] | None,
                dict[VmKey, VmCounters]]


def log2_buckets(values: np.ndarray) -> np.ndarray:
    """Histogram (length HIST_BUCKETS) of ns values in log2 buckets, like bpf_log2l.

    Bucket i counts ``2**i <= v < 2**(i+1)``; bucket 0 also holds 0; the last bucket holds
    everything above.
    """
    idx = np.searchsorted(_POW2, values.astype(np.uint64, copy=False), side="right")
    return np.bincount(idx, minlength=HIST_BUCKETS)[:HIST_BUCKETS]


def record_columns(events: np.ndarray) -> EventColumns:
    """EVENT_DTYPE records (time order) as columns, grouped by (pid, vm, ring, kind) (the
    group table's ``tid`` is 0: no counter reads it)."""
    n = len(events)
    table = np.zeros(0, [(f, EVENT_DTYPE[f]) for f in GROUP_FIELDS])
    if n == 0:
        return EventColumns(0, table, None, None, events["ts"].copy(), {}, {})
    pid, vm = events["pid"].astype(np.uint64), events["vm"].astype(np.int64)
    ring, kind = events["ring"].astype(np.int64), events["kind"].astype(np.uint64)
    v0, r0 = int(vm.min()), int(ring.min())
    if int(vm.max()) - v0 < 0xFFF and int(ring.max()) - r0 < 0xFFF:  # one u64 per key
        packed = ((pid << np.uint64(32)) | ((vm - v0).astype(np.uint64) << np.uint64(20))
                  | ((ring - r0).astype(np.uint64) << np.uint64(8)) | kind)
        _, first, gid = np.unique(packed, return_index=True, return_inverse=True)
    else:
        keys = np.empty(n, [("pid", "<u4"), ("vm", "<i4"), ("ring", "<i4"), ("kind", "u1")])
        for f in keys.dtype.names:
            keys[f] = events[f]
        _, first, gid = np.unique(keys, return_index=True, return_inverse=True)
    gid = gid.ravel()
    table = np.zeros(len(first), table.dtype)
    for f in ("pid", "vm", "ring", "kind"):
        table[f] = events[f][first]
    order = np.argsort(gid, kind="stable")
    grouped = {f: np.take(events[f], order) for f in COLUMN_FIELDS}
    gid = gid.astype(np.uint16 if len(first) > 0xFF else np.uint8)
    if len(first) == 1:
        return EventColumns(n, table, None, None, events["ts"].copy(), grouped, {})
    return EventColumns(n, table, gid, order, events["ts"].copy(), grouped, {})


def _column(parts: EventColumns, name: str, g: int, a: int, b: int) -> np.ndarray:
    """Column ``name`` of group ``g``'s events at group-major positions a..b: a slice, or
    one value (a column constant within each group)."""
    c = parts.const.get(name)
    if c is not None:
        return c[g:g + 1]
    return parts.grouped[name][a:b]


class Aggregator:
    """Cumulative per-ring counters fed with events in time order.

    ``pid``: keep only events of this VMM process (0 = all). ``meta`` supplies ring sizes the
    events do not carry (``--ring-entries``/``--ring-bytes`` of imported text). ``owns``:
    count only these rings (one worker's share, :mod:`.spread_snapshots`; every RING_SIZE
    event is still read); ``vm_events``: count the KVM_RESET_DIRTY_RINGS latencies (one
    worker of several does).
    """

    def __init__(self, meta: SourceMeta | None = None, *, pid: int = 0,
                 owns: Owns | None = None, vm_events: bool = True) -> None:
        self.meta = meta if meta is not None else SourceMeta(kind="events")
        self._sizes = RingSizes(self.meta)  # the trace's RING_SIZE events, else the meta
        self.pid = pid
        self.owns = owns
        self.vm_events = vm_events
        self.lost_events = 0
        self.events = 0  #: events fed (after the pid filter)
        self.time_ns = 0  #: ts of the last event fed
        self._rings: dict[RingKey, RingCounters] = {}
        self._have_index: set[RingKey] = set()
        self._vms: dict[tuple[int, int], VmInfo] = {}
        self._vm_counters: dict[VmKey, VmCounters] = {}
        self._changed: set[RingKey] = set()  # since take_changes()
        self._changed_vms = False
        self._changed_vmc: set[VmKey] = set()

    # -- feeding --------------------------------------------------------------------------
    def feed(self, events: np.ndarray) -> None:
        """Add one batch (EVENT_DTYPE, time order) to the counters."""
        if len(events):
            parts = record_columns(events)
            self.feed_columns(parts, 0, parts.n, parts.group_starts())

    def add_lost(self, n: int) -> None:
        """Lost events: events the producer could not deliver (a source's ``lost``)."""
        self.lost_events += int(n)

    def feed_columns(self, parts: EventColumns, lo: int = 0, hi: int | None = None,
                     bounds: np.ndarray | None = None) -> None:
        """Add the events at time positions ``lo``..``hi`` of a block (its columns; ``hi``
        None: to its end). ``bounds``: its ``group_starts()``, when known.

        Per batch, the per-VM events come first (latencies, then ring sizes in time
        order: a size applies to the batch's pushes), then each ring's."""
        n = parts.n
        hi = n if hi is None else min(hi, n)
        if hi <= lo:
            return
        table = parts.groups
        pids, vms = table["pid"].tolist(), table["vm"].tolist()
        rings, kinds = table["ring"].tolist(), table["kind"].tolist()
        if self.pid:  # every group of the process: what its events and last ts need
            want = [g for g, p in enumerate(pids) if p == self.pid]
        else:
            want = self._wanted(pids, vms, rings, kinds)
        spans = self._spans(parts, lo, hi, bounds, want)
        if self.pid:
            if not spans:
                return
            self.events += sum(b - a for _, a, b in spans)
            order = parts.order
            last = hi - 1 if order is None else max(int(order[b - 1]) for _, _, b in spans)
        else:
            self.events += hi - lo
            last = hi - 1
        self.time_ns = max(self.time_ns, int(parts.ts[last]))
        if self.vm_events:
            self._latencies(parts, [s for s in spans if kinds[s[0]] == _RESET_LAT], pids, vms)
        sized = [s for s in spans if kinds[s[0]] == _RING_SIZE]
        if sized:
            self._size_events(parts, sized, pids, vms)
        per_ring: dict[tuple[int, int, int], list[Span]] = {}
        for s in spans:
            g = s[0]
            if kinds[g] not in _PER_VM:
                per_ring.setdefault((pids[g], vms[g], rings[g]), []).append(s)
        owns = self.owns
        for key in sorted(per_ring):
            if owns is None or owns(key):
                self._feed_ring(RingKey(*key), parts, per_ring[key], kinds)

    def _wanted(self, pids: list[int], vms: list[int], rings: list[int], kinds: list[int]
                ) -> list[int] | None:
        """The groups this aggregator reads (None: all): ring sizes, latencies if it
        counts them, its own rings."""
        owns = self.owns
        if owns is None:
            return None
        return [g for g, k in enumerate(kinds)
                if k == _RING_SIZE or (k == _RESET_LAT and self.vm_events)
                or (k not in _PER_VM and owns((pids[g], vms[g], rings[g])))]

    @staticmethod
    def _spans(parts: EventColumns, lo: int, hi: int, bounds: np.ndarray | None,
               want: list[int] | None = None) -> list[Span]:
        """Each group's (of ``want``, default all) events at time positions lo..hi, as
        group-major positions."""
        if parts.gid is None:
            return [(0, lo, hi)] if want is None or 0 in want else []
        if bounds is None:
            bounds = parts.group_starts()
            assert bounds is not None
        order = parts.order
        assert order is not None
        edges = bounds.tolist()
        whole = lo == 0 and hi == parts.n
        out = []
        for g in range(len(edges) - 1) if want is None else want:
            a, b = edges[g], edges[g + 1]
            if a == b:
                continue
            if not whole:  # each group's time positions are increasing
                pos = order[a:b]
                a, b = a + int(pos.searchsorted(lo)), a + int(pos.searchsorted(hi))
                if a == b:
                    continue
            out.append((g, a, b))
        return out

    def _latencies(self, parts: EventColumns, spans: list[Span], pids: list[int],
                   vms: list[int]) -> None:
        """KT_RESET_LAT events: a VM's KVM_RESET_DIRTY_RINGS ioctls and their ns."""
        per_vm: dict[tuple[int, int], list[np.ndarray]] = {}
        for g, a, b in spans:
            v = _column(parts, "value", g, a, b)
            per_vm.setdefault((pids[g], vms[g]), []).append(
                np.broadcast_to(v, (b - a,)) if len(v) != b - a else v)
        for (pid, vm), parts_ns in sorted(per_vm.items()):
            ns = np.concatenate(parts_ns)
            key = VmKey(pid, vm)
            vc = self._vm_counters.setdefault(key, VmCounters())
            vc.reset_ioctls += len(ns)
            vc.reset_ns += int(ns.sum(dtype=np.uint64))
            _add_hist(vc.reset_lat_hist, log2_buckets(ns))
            self._changed_vmc.add(key)
            self._vm(pid, vm)

    def _size_events(self, parts: EventColumns, spans: list[Span], pids: list[int],
                     vms: list[int]) -> None:
        """KT_RING_SIZE events, in time order."""
        got: list[tuple[int, int, int, int]] = []  # (time position, pid, vm, bytes)
        for g, a, b in spans:
            values = np.broadcast_to(_column(parts, "value", g, a, b), (b - a,)).tolist()
            where = range(a, b) if parts.order is None else parts.order[a:b].tolist()
            got += [(t, pids[g], vms[g], v) for t, v in zip(where, values, strict=True)]
        for _, pid, vm, ring_bytes in sorted(got):
            self._ring_size_event(pid, vm, ring_bytes)

    def _ring_size_event(self, pid: int, vm: int, ring_bytes: int) -> None:
        info = self._vm(pid, vm)
        info.ring_bytes = ring_bytes
        self._changed_vms = True
        size = self._sizes.from_event(pid, vm, ring_bytes)
        for key, counters in self._rings.items():
            if size is not None and key.pid == pid and key.vm == vm:
                counters.size = size
                self._changed.add(key)

    def _vm(self, pid: int, vm: int) -> VmInfo:
        info = self._vms.get((pid, vm))
        if info is None:
            who = self.meta.vm_name(pid, vm)  # a recording's names (format 1.2 on)
            info = self._vms[(pid, vm)] = VmInfo(
                pid=pid, vm=vm, comm=(who.comm if who else "") or self._comm(pid),
                name=who.name if who else None, vmm=who.vmm if who else None)
            self._changed_vms = True
        return info

    def _comm(self, pid: int) -> str:
        comms = self.meta.extra.get("comm")
        if isinstance(comms, dict):
            return str(comms.get(pid, comms.get(str(pid), "")))
        return ""

    def _ring(self, rk: RingKey) -> RingCounters:
        counters = self._rings.get(rk)
        if counters is None:
            self._vm(rk.pid, rk.vm)
            size = self._sizes.size(rk.pid, rk.vm)[0]
            counters = self._rings[rk] = RingCounters(size=size)
        return counters

    def _feed_ring(self, key: RingKey, parts: EventColumns, spans: list[Span],
                   kinds: list[int]) -> None:
        c = self._ring(key)
        self._changed.add(key)
        indexed: list[tuple[int, int, int, bool]] = []
        for g, a, b in spans:
            k = kinds[g]
            if k == _PUSH:
                c.pushes += b - a
                indexed.append((g, a, b, True))
            elif k == _RESET:
                c.resets += b - a
                indexed.append((g, a, b, False))
            elif k == _EXIT:
                c.soft_full_exits += b - a
            elif k == _STALL:
                ns = _column(parts, "value", g, a, b)
                times = b - a if len(ns) != b - a else 1  # one value for all
                c.stall_ns += int(ns.sum(dtype=np.uint64)) * times
                _add_hist(c.stall_hist, log2_buckets(ns) * times)
        if indexed:
            self._feed_indices(key, c, parts, indexed)

    def _feed_indices(self, key: RingKey, c: RingCounters, parts: EventColumns,
                      spans: list[tuple[int, int, int, bool]]) -> None:
        """Pushes and resets (their dirty_index and reset_index, free-running u32)."""
        if key in self._have_index:
            d0, r0 = c.dirty_index, c.reset_index
        else:  # the ring's first indexed event (by time) sets the start
            order = parts.order
            g, a, _, _ = min(spans, key=lambda s: s[1] if order is None else int(order[s[1]]))
            d0 = int(_column(parts, "dirty_index", g, a, a + 1)[0])
            r0 = int(_column(parts, "reset_index", g, a, a + 1)[0])
        base_d, base_r = np.uint32(d0), np.uint32(r0)
        most = fd = fr = 0
        lost = 0
        for g, a, b, push in spans:
            di = _column(parts, "dirty_index", g, a, b)
            ri = _column(parts, "reset_index", g, a, b)
            used = di - ri  # u32 arithmetic: (dirty - reset) mod 2**32
            top = int(used.max())
            most = max(most, top)
            if push and c.size is not None and top > c.size:
                over = int(np.count_nonzero(used > c.size))
                lost += over * (b - a) if len(used) == 1 else over
            fd = max(fd, _furthest(di, base_d))
            fr = max(fr, _furthest(ri, base_r))
        c.max_used = max(c.max_used, most)
        c.lost += lost
        c.entries_reset += fr
        c.reset_index = u32(r0 + fr)
        c.dirty_index = u32(d0 + fd)
        self._have_index.add(key)

    # -- reading --------------------------------------------------------------------------
    def snapshot(self, time_ns: int | None = None) -> Snapshot:
        """A copy of the counters now (keys in order); ``time_ns`` defaults to the last
        event's ts."""
        return Snapshot(
            time_ns=self.time_ns if time_ns is None else time_ns,
            rings={k: _ring_copy(c) for k, c in sorted(self._rings.items())},
            vms={k: copy.copy(v) for k, v in sorted(self._vms.items())},
            vm_counters={k: _vmc_copy(v) for k, v in sorted(self._vm_counters.items())},
            lost_events=self.lost_events,
        )

    def take_changes(self) -> Changes:
        """Copies of what changed since the last call: the rings fed or resized, every VM
        if any VM was added or resized (else None), the VM counters fed."""
        rings = {k: _ring_copy(self._rings[k]) for k in sorted(self._changed)}
        vms = ({k: copy.copy(v) for k, v in sorted(self._vms.items())}
               if self._changed_vms else None)
        vmc = {k: _vmc_copy(self._vm_counters[k]) for k in sorted(self._changed_vmc)}
        self._changed.clear()
        self._changed_vmc.clear()
        self._changed_vms = False
        return rings, vms, vmc


def _ring_copy(c: RingCounters) -> RingCounters:
    out = copy.copy(c)
    out.stall_hist = list(c.stall_hist)
    return out


def _vmc_copy(c: VmCounters) -> VmCounters:
    out = copy.copy(c)
    out.reset_lat_hist = list(c.reset_lat_hist)
    return out


def _furthest(idx: np.ndarray, base: np.uint32) -> int:
    """How far the free-running u32 indices ``idx`` got past ``base`` (0 if none did):
    each difference mod 2**32 read as a signed 32-bit distance."""
    return max(0, int((idx - base).view(np.int32).max()))


def _add_hist(dst: list[int], add: np.ndarray) -> None:
    for i in np.flatnonzero(add):
        dst[i] += int(add[i])


Block = tuple[EventColumns, "np.ndarray | None"]  # a block's columns and its group_starts()
Feed = Callable[[EventColumns, int, int, "np.ndarray | None"], None]


def source_blocks(source: EventSource) -> Iterator[Block]:
    """A source's blocks as columns (a recording's as stored, a text trace's batches
    grouped by :func:`record_columns`), each with its group_starts()."""
    columns: Iterable[EventColumns] | None = source.column_batches()
    if columns is None:
        columns = (record_columns(b) for b in source.batches() if len(b))
    for parts in columns:
        yield parts, parts.group_starts()


class StepClock:
    """A walk through a stream of blocks by fixed steps of its time (ns), feeding each
    step's events to ``feed(parts, lo, hi, bounds)`` block by block: the windows of
    :class:`ReplaySource`, the same for any reader of the same blocks (a worker of
    :mod:`.spread_snapshots` feeding its rings only).

    :meth:`start` gives the first window's end: the first event's ts (0: no event). Each
    :meth:`advance` jumps over steps with no event (keeping one empty step before the
    next event), feeds the events before the next window end and gives that end. A block
    is read once the previous one is used up (its read may raise: a damaged block)."""

    def __init__(self, blocks: Iterator[Block], step_ns: int, feed: Feed) -> None:
        if step_ns <= 0:
            raise ValueError("step_ns must be positive")
        self.step_ns = int(step_ns)
        self._blocks = blocks
        self._feed = feed
        self._parts: EventColumns | None = None
        self._bounds: np.ndarray | None = None
        self._pos = 0
        self.exhausted = False
        self.until: int | None = None  #: end of the last window (None: not started)
        self.skipped_steps = 0  #: empty steps jumped over (a gap in the file's time)

    @property
    def done(self) -> bool:
        """True once every event has been fed."""
        return self.exhausted and self._parts is None

    def fill(self) -> bool:
        """A block with events not yet fed is at hand (reading the next if need be)."""
        while self._parts is None:
            try:
                parts, bounds = next(self._blocks)
            except StopIteration:
                self.exhausted = True
                return False
            if parts.n:
                self._parts, self._bounds, self._pos = parts, bounds, 0
        return True

    def _next_ts(self) -> int:
        assert self._parts is not None
        return int(self._parts.ts[self._pos])

    def start(self) -> int:
        self.until = self._next_ts() if self.fill() else 0
        return self.until

    def advance(self) -> int:
        assert self.until is not None, "start() first"
        if self.done:
            return self.until
        if self.fill():  # jump over empty steps
            k = (self._next_ts() - self.until) // self.step_ns - 1
            if k > 0:
                self.until += k * self.step_ns
                self.skipped_steps += k
        self.until += self.step_ns
        while self.fill():
            parts = self._parts
            assert parts is not None
            cut = int(np.searchsorted(parts.ts[self._pos:], self.until, side="left"))
            if cut:
                self._feed(parts, self._pos, self._pos + cut, self._bounds)
                self._pos += cut
            if self._pos < parts.n:
                break
            self._parts = self._bounds = None
        return self.until


class ReplaySource(SnapshotSource):
    """A SnapshotSource over an EventSource: file time advances ``step_ns`` per snapshot.

    The first :meth:`snapshot` is the empty state at the first event's ts; each later call
    feeds the events of the next ``step_ns`` of file time and returns the state at the end of
    that window (``time_ns`` = window end; the last window ends at the last event's ts).
    Once :attr:`done`, further calls return the final state again.
    """

    def __init__(self, source: EventSource, step_ns: int, *, pid: int = 0) -> None:
        if step_ns <= 0:
            raise ValueError("step_ns must be positive")
        self.source = source
        self.meta = source.meta
        self.step_ns = int(step_ns)
        self.agg = Aggregator(source.meta, pid=pid)
        self.clock = StepClock(source_blocks(source), self.step_ns, self.agg.feed_columns)
        self._time = 0

    @property
    def skipped_steps(self) -> int:
        """Empty steps jumped over (a gap in the file's time)."""
        return self.clock.skipped_steps

    @property
    def warnings(self) -> list[str]:
        """The source's one-line warnings (a text trace's rings not told apart), known
        once its first batch is read (this reads it)."""
        if self.clock.until is None:
            self.clock.fill()
        return list(self.source.warnings)

    @property
    def done(self) -> bool:
        """True once every event of the source has been fed."""
        return self.clock.done

    def snapshot(self) -> Snapshot:
        if self.clock.until is None:
            self._time = self.clock.start()
            return self.agg.snapshot(self._time)
        if not self.done:
            until = self.clock.advance()
            self._time = until if not self.done else max(self._time, self.agg.time_ns)
            if self.done:
                self.agg.lost_events = int(self.source.lost)
        return self.agg.snapshot(self._time)
