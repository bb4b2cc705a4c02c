"""Per-ring counters computed in user space from any event stream.

:class:`Aggregator` turns :data:`~kvmtrace.core.events.EVENT_DTYPE` batches into the same
cumulative :class:`~kvmtrace.core.counters.Snapshot` counters the in-kernel BPF maps keep,
so ``top`` runs over a recording or an imported ftrace/``perf script`` text exactly as over
the live kernel. :class:`ReplaySource` wraps an EventSource as a SnapshotSource that moves
through the file's time by a fixed step per :meth:`~ReplaySource.snapshot` call.

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
from collections.abc import Iterator

import numpy as np

from ..core.counters import HIST_BUCKETS, RingCounters, RingKey, Snapshot, VmCounters, VmInfo, VmKey
from ..core.events import Kind
from ..core.kvm_abi import U32_MASK, u32
from ..core.sources import EventSource, SnapshotSource, SourceMeta
from ..model.sizes import RingSizes

__all__ = ["Aggregator", "ReplaySource", "log2_buckets"]

_U32 = np.int64(U32_MASK)  # an int64 scalar keeps int64 columns int64
# 2**1 .. 2**(HIST_BUCKETS-1): searchsorted(side="right") gives floor(log2 v) for v >= 1.
_POW2 = np.array([1 << i for i in range(1, HIST_BUCKETS)], dtype=np.uint64)


def log2_buckets(values: np.ndarray) -> np.ndarray:
    """Histogram (length HIST_BUCKETS) of ns values in log2 buckets, like bpf_log2l.

    Bucket i counts ``2**i <= v < 2**(i+1)``; bucket 0 also holds 0; the last bucket holds
    everything above.
    """
    idx = np.searchsorted(_POW2, values.astype(np.uint64, copy=False), side="right")
    return np.bincount(idx, minlength=HIST_BUCKETS)[:HIST_BUCKETS]


class Aggregator:
    """Cumulative per-ring counters fed with EVENT_DTYPE batches in time order.

    ``pid``: keep only events of this VMM process (0 = all). ``meta`` supplies ring sizes the
    events do not carry (``--ring-entries``/``--ring-bytes`` of imported text).
    """

    def __init__(self, meta: SourceMeta | None = None, *, pid: int = 0) -> None:
        self.meta = meta if meta is not None else SourceMeta(kind="events")
        self._sizes = RingSizes(self.meta)  # the trace's RING_SIZE events, else the meta
        self.pid = pid
        self.lost_events = 0
        self.events = 0  #: events fed (after the pid filter)
        self.time_ns = 0  #: ts of the last event fed
        self._rings: dict[RingKey, RingCounters] = {}
        self._have_index: set[RingKey] = set()
        self._vms: dict[tuple[int, int], VmInfo] = {}
        self._vm_counters: dict[VmKey, VmCounters] = {}

    # -- feeding --------------------------------------------------------------------------
    def feed(self, events: np.ndarray) -> None:
        """Add one batch (EVENT_DTYPE, time order) to the counters."""
        if self.pid:
            events = events[events["pid"] == self.pid]
        if len(events) == 0:
            return
        self.events += len(events)
        self.time_ns = max(self.time_ns, int(events["ts"][-1]))
        kinds = events["kind"]
        per_vm = (kinds == Kind.RING_SIZE) | (kinds == Kind.RESET_LAT)
        if per_vm.any():
            self._vm_events(events[per_vm])
            events = events[~per_vm]
            if len(events) == 0:
                return
        keys = np.empty(len(events), dtype=[("pid", "<u4"), ("vm", "<i4"), ("ring", "<i4")])
        keys["pid"], keys["vm"], keys["ring"] = events["pid"], events["vm"], events["ring"]
        uniq, inverse = _unique_keys(keys)
        if len(uniq) == 1:
            self._feed_ring(self._ring(uniq[0]), events)
            return
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(1, len(uniq)))
        for key, part in zip(uniq, np.split(order, bounds), strict=True):
            self._feed_ring(self._ring(key), events[part])

    def add_lost(self, n: int) -> None:
        """Lost events: events the producer could not deliver (a source's ``lost``)."""
        self.lost_events += int(n)

    def _vm_events(self, events: np.ndarray) -> None:
        lat = events[events["kind"] == Kind.RESET_LAT]
        for pid, vm in {(int(p), int(v)) for p, v in zip(lat["pid"], lat["vm"], strict=True)}:
            ns = lat["value"][(lat["pid"] == pid) & (lat["vm"] == vm)]
            vc = self._vm_counters.setdefault(VmKey(pid, vm), VmCounters())
            vc.reset_ioctls += len(ns)
            vc.reset_ns += int(ns.sum(dtype=np.uint64))
            _add_hist(vc.reset_lat_hist, log2_buckets(ns))
            self._vm(pid, vm)
        for ev in events[events["kind"] == Kind.RING_SIZE]:
            self._ring_size_event(int(ev["pid"]), int(ev["vm"]), int(ev["value"]))

    def _ring_size_event(self, pid: int, vm: int, ring_bytes: int) -> None:
        info = self._vm(pid, vm)
        info.ring_bytes = ring_bytes
        size = self._sizes.from_event(pid, vm, ring_bytes)
        for key, counters in self._rings.items():
            if size is not None and key.pid == pid and key.vm == vm:
                counters.size = size

    def _vm(self, pid: int, vm: int) -> VmInfo:
        info = self._vms.get((pid, vm))
        if info is None:
            who = self.meta.vm_name(pid, vm)  # a recording's names (format 1.2 on)
            info = self._vms[(pid, vm)] = VmInfo(
                pid=pid, vm=vm, comm=(who.comm if who else "") or self._comm(pid),
                name=who.name if who else None, vmm=who.vmm if who else None)
        return info

    def _comm(self, pid: int) -> str:
        comms = self.meta.extra.get("comm")
        if isinstance(comms, dict):
            return str(comms.get(pid, comms.get(str(pid), "")))
        return ""

    def _ring(self, key: np.void) -> tuple[RingKey, RingCounters]:
        rk = RingKey(int(key["pid"]), int(key["vm"]), int(key["ring"]))
        counters = self._rings.get(rk)
        if counters is None:
            self._vm(rk.pid, rk.vm)
            size = self._sizes.size(rk.pid, rk.vm)[0]
            counters = self._rings[rk] = RingCounters(size=size)
        return rk, counters

    def _feed_ring(self, ring: tuple[RingKey, RingCounters], ev: np.ndarray) -> None:
        key, c = ring
        kinds = ev["kind"]
        is_push = kinds == Kind.PUSH
        is_reset = kinds == Kind.RESET
        c.pushes += int(is_push.sum())
        c.resets += int(is_reset.sum())
        c.soft_full_exits += int((kinds == Kind.EXIT).sum())
        indexed = is_push | is_reset
        if indexed.any():
            self._feed_indices(key, c, ev[indexed], is_reset[indexed])
        stalls = ev["value"][kinds == Kind.STALL]
        if len(stalls):
            c.stall_ns += int(stalls.sum(dtype=np.uint64))
            _add_hist(c.stall_hist, log2_buckets(stalls))

    def _feed_indices(
        self, key: RingKey, c: RingCounters, ev: np.ndarray, is_reset: np.ndarray
    ) -> None:
        di = ev["dirty_index"].astype(np.int64)
        ri = ev["reset_index"].astype(np.int64)
        used = (di - ri) & _U32
        c.max_used = max(c.max_used, int(used.max()))
        if c.size is not None:
            c.lost += int((used[~is_reset] > c.size).sum())
        if key in self._have_index:
            d0, r0 = c.dirty_index, c.reset_index
        else:
            d0, r0 = int(di[0]), int(ri[0])
        advance = _furthest(ri, r0)
        c.entries_reset += advance
        c.reset_index = u32(r0 + advance)
        c.dirty_index = u32(d0 + _furthest(di, d0))
        self._have_index.add(key)

    # -- reading --------------------------------------------------------------------------
    def snapshot(self, time_ns: int | None = None) -> Snapshot:
        """A copy of the counters now; ``time_ns`` defaults to the last event's ts."""
        return Snapshot(
            time_ns=self.time_ns if time_ns is None else time_ns,
            rings=copy.deepcopy(self._rings),
            vms=copy.deepcopy(self._vms),
            vm_counters=copy.deepcopy(self._vm_counters),
            lost_events=self.lost_events,
        )


def _furthest(idx: np.ndarray, base: int) -> int:
    """How far the free-running u32 indices ``idx`` got past ``base`` (0 if none did)."""
    rel = (idx - base) & _U32
    rel = np.where(rel > 0x7FFFFFFF, rel - (1 << 32), rel)
    return max(0, int(rel.max()))


def _unique_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` of (pid, vm, ring) records, through one
    uint64 per key when vm and ring each span fewer than 2**16 values (sorting records is
    ~20x slower); vm may be negative (-1 unknown, -2, -3, ... VMs told apart in text)."""
    vm, ring = keys["vm"].astype(np.int64), keys["ring"].astype(np.int64)
    v0, r0 = int(vm.min()), int(ring.min())
    if int(vm.max()) - v0 < 0xFFFF and int(ring.max()) - r0 < 0xFFFF:
        packed = ((keys["pid"].astype(np.uint64) << np.uint64(32))
                  | ((vm - v0).astype(np.uint64) << np.uint64(16))
                  | (ring - r0).astype(np.uint64))
        _, first, inverse = np.unique(packed, return_index=True, return_inverse=True)
        return keys[first], inverse.ravel()
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, inverse.ravel()


def _add_hist(dst: list[int], add: np.ndarray) -> None:
    for i in np.flatnonzero(add):
        dst[i] += int(add[i])


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
        self._batches: Iterator[np.ndarray] = iter(source.batches())
        self._pending: np.ndarray | None = None
        self._exhausted = False
        self._until: int | None = None
        self._time = 0
        self.skipped_steps = 0  #: empty steps jumped over (a gap in the file's time)

    @property
    def warnings(self) -> list[str]:
        """The source's one-line warnings (a text trace's rings not told apart), known
        once its first batch is read (this reads it)."""
        if self._until is None and self._pending is None and not self._exhausted:
            self._fill()
        return list(self.source.warnings)

    @property
    def done(self) -> bool:
        """True once every event of the source has been fed."""
        return self._exhausted and (self._pending is None or len(self._pending) == 0)

    def _fill(self) -> bool:
        while self._pending is None or len(self._pending) == 0:
            try:
                self._pending = next(self._batches)
            except StopIteration:
                self._exhausted = True
                self._pending = None
                return False
        return True

    def _skip_empty(self) -> None:
        """Jump over steps with no event, keeping one empty step before the next event:
        the number of snapshots is bounded by the events, not by the file's time span."""
        if self._until is None or not self._fill():
            return
        assert self._pending is not None
        k = (int(self._pending["ts"][0]) - self._until) // self.step_ns - 1
        if k > 0:
            self._until += k * self.step_ns
            self.skipped_steps += k

    def snapshot(self) -> Snapshot:
        if self._until is None:
            self._until = int(self._pending["ts"][0]) if self._fill() else 0
            self._time = self._until
            return self.agg.snapshot(self._time)
        if not self.done:
            self._skip_empty()
            self._until += self.step_ns
            while self._fill():
                assert self._pending is not None
                cut = int(np.searchsorted(self._pending["ts"], self._until, side="left"))
                self.agg.feed(self._pending[:cut])
                self._pending = self._pending[cut:]
                if len(self._pending):
                    break
            self._time = self._until if not self.done else max(self._time, self.agg.time_ns)
            if self.done:
                self.agg.lost_events = int(self.source.lost)
        return self.agg.snapshot(self._time)
