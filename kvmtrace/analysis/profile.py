"""Performance profile of one dirty-ring trace, the input of ``kvmtrace compare``.

:func:`profile_source` reads an :class:`~kvmtrace.core.sources.EventSource` once, batch by
batch (bounded memory), and returns a :class:`Profile`: the span (first to last event, ns)
and one :class:`RingProfile` per ring index (``struct kvm_dirty_ring.index``, the vCPU
index) plus an ``"all"`` row. Rings are keyed by index, not by (pid, VM fd), so two runs of
the same VM shape line up although their pids differ; rings of several VMs with the same
index add up in one row.

The counters (pushes, soft-full exits, resets, entries reset, max used, overwritten
entries) come from :class:`~kvmtrace.analysis.aggregate.Aggregator`; this module only adds
the exact distributions it does not keep (it has log2 buckets):

- stall ns: the ``value`` of Kind.STALL events (exit 31 reaching userspace to the vCPU's
  next ``KVM_RUN``). Text traces have no such events; then a stall is timed from each
  soft-full exit (Kind.EXIT) to the next push of the same ring, and
  :attr:`Profile.stall_source` says so.
- reset latency ns: the ``value`` of Kind.RESET_LAT events (one ``KVM_RESET_DIRTY_RINGS``
  ioctl, VM-wide, so only in the ``"all"`` row); recordings only.

Each distribution is a :class:`~kvmtrace.analysis.distribution.Reservoir` (exact up to
``cap`` values, a uniform sample beyond, flagged ``sampled``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.counters import VmInfo
from ..core.events import Kind
from ..core.sources import EventSource
from .aggregate import Aggregator
from .distribution import DEFAULT_CAP, Reservoir

__all__ = [
    "ALL",
    "STALL_EVENTS",
    "STALL_EXIT_TO_PUSH",
    "Profile",
    "RingProfile",
    "StallCollector",
    "profile_source",
]

ALL = "all"  #: the row key of the whole trace
STALL_EVENTS = "stall events"  #: stalls measured by the probes (exit 31 -> next KVM_RUN)
STALL_EXIT_TO_PUSH = "soft-full exit -> next push"  #: stalls derived from a text trace


@dataclass
class RingProfile:
    """Totals of one ring index (or of the whole trace), counts in events or entries."""

    pushes: int = 0  #: kvm_dirty_ring_push events
    soft_full_exits: int = 0  #: kvm_dirty_ring_exit events
    resets: int = 0  #: kvm_dirty_ring_reset events
    entries_reset: int = 0  #: sum of reset_index advances, entries
    max_used: int = 0  #: largest dirty_index - reset_index seen, entries
    overwritten: int = 0  #: pushes that left used > ring size (only when the size is known)
    stall_ns: Reservoir = field(default_factory=Reservoir)
    reset_lat_ns: Reservoir = field(default_factory=Reservoir)

    def push_rate(self, span_ns: int) -> float | None:
        """Pushes per second over the trace's span; None for a zero span."""
        return self.pushes * 1e9 / span_ns if span_ns > 0 else None

    @property
    def exits_per_10k(self) -> float | None:
        """Soft-full exits per 10 000 pushes; None without pushes."""
        return self.soft_full_exits * 1e4 / self.pushes if self.pushes else None

    @property
    def entries_per_reset(self) -> float | None:
        """Entries collected per kvm_dirty_ring_reset event; None without resets."""
        return self.entries_reset / self.resets if self.resets else None


@dataclass
class Profile:
    """What :func:`profile_source` found in one trace."""

    kind: str  #: SourceMeta.kind: "recording", "ftrace", "perf-script"
    events: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    lost_events: int = 0  #: events the producer could not deliver (source.lost)
    stall_source: str | None = None  #: STALL_EVENTS, STALL_EXIT_TO_PUSH or None (no stalls)
    rings: dict[int | str, RingProfile] = field(default_factory=dict)  #: index or ALL
    #: the trace's VMs in (pid, vm) order with their names, VMM kind and comm where the
    #: source carries them (recordings of format 1.2 on; text traces: name None)
    vms: list[VmInfo] = field(default_factory=list)

    @property
    def span_ns(self) -> int:
        """ns from the first to the last event (0 for fewer than two timestamps)."""
        if self.first_ns is None or self.last_ns is None:
            return 0
        return self.last_ns - self.first_ns

    @property
    def sampled(self) -> bool:
        """True when some distribution holds a sample rather than every value."""
        return any(r.stall_ns.sampled or r.reset_lat_ns.sampled for r in self.rings.values())

    def ring_keys(self) -> list[int | str]:
        """Ring indices in order, then ALL."""
        idx = sorted(k for k in self.rings if isinstance(k, int))
        return [*idx, ALL]


class StallCollector:
    """Both kinds of stall per ring index: Kind.STALL values, and soft-full exit to the next
    push of the same (pid, VM, ring), across batch boundaries."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.measured: dict[int | str, Reservoir] = {}
        self.derived: dict[int | str, Reservoir] = {}
        self._pending: dict[tuple[int, int, int], np.ndarray] = {}  # exit ts awaiting a push

    def feed(self, ev: np.ndarray) -> None:
        kinds = ev["kind"]
        st = ev[kinds == Kind.STALL]
        for ring in np.unique(st["ring"]):
            vals = st["value"][st["ring"] == ring]
            self._res(self.measured, int(ring)).add(vals)
            self._res(self.measured, ALL).add(vals)
        is_exit = kinds == Kind.EXIT
        ex = ev[is_exit]
        keys = set(zip(ex["pid"].tolist(), ex["vm"].tolist(), ex["ring"].tolist(),
                       strict=True))
        if not keys and not self._pending:
            return
        mine = is_exit | (kinds == Kind.PUSH)
        for key in keys | set(self._pending):
            sel = mine & (ev["pid"] == key[0]) & (ev["vm"] == key[1]) & (ev["ring"] == key[2])
            self._pair(key, ev[sel])

    def _pair(self, key: tuple[int, int, int], part: np.ndarray) -> None:
        is_exit = part["kind"] == Kind.EXIT
        exits = np.concatenate((self._pending.pop(key, np.empty(0, np.int64)),
                                part["ts"][is_exit].astype(np.int64)))
        pushes = part["ts"][~is_exit].astype(np.int64)
        nxt = np.searchsorted(pushes, exits, side="right")
        done = nxt < len(pushes)
        if done.any():
            vals = pushes[nxt[done]] - exits[done]
            self._res(self.derived, key[2]).add(vals)
            self._res(self.derived, ALL).add(vals)
        if not done.all():
            self._pending[key] = exits[~done]

    def _res(self, table: dict[int | str, Reservoir], key: int | str) -> Reservoir:
        res = table.get(key)
        if res is None:
            res = table[key] = Reservoir(self.cap)
        return res


def profile_source(source: EventSource, *, cap: int = DEFAULT_CAP) -> Profile:
    """Read ``source`` once and profile it; distributions keep at most ``cap`` values."""
    agg = Aggregator(source.meta)
    stalls = StallCollector(cap)
    reset_lat = Reservoir(cap)
    prof = Profile(kind=source.meta.kind)
    for batch in source.batches():
        if len(batch) == 0:
            continue
        if prof.first_ns is None:
            prof.first_ns = int(batch["ts"][0])
        prof.last_ns = int(batch["ts"][-1])
        prof.events += len(batch)
        agg.feed(batch)
        stalls.feed(batch)
        reset_lat.add(batch["value"][batch["kind"] == Kind.RESET_LAT])
    prof.lost_events = int(source.lost)
    total = prof.rings[ALL] = RingProfile(stall_ns=Reservoir(1), reset_lat_ns=reset_lat)
    snap = agg.snapshot()
    prof.vms = [snap.vms[k] for k in sorted(snap.vms)]
    for key, c in snap.rings.items():
        row = prof.rings.get(key.ring)
        if row is None:
            row = prof.rings[key.ring] = RingProfile(stall_ns=Reservoir(1),
                                                     reset_lat_ns=Reservoir(1))
        for r in (row, total):
            r.pushes += c.pushes
            r.soft_full_exits += c.soft_full_exits
            r.resets += c.resets
            r.entries_reset += c.entries_reset
            r.overwritten += c.lost
            r.max_used = max(r.max_used, c.max_used)
    table = stalls.measured or stalls.derived
    if table:
        prof.stall_source = STALL_EVENTS if stalls.measured else STALL_EXIT_TO_PUSH
    for key, res in table.items():
        if key not in prof.rings:
            prof.rings[key] = RingProfile(reset_lat_ns=Reservoir(1))
        prof.rings[key].stall_ns = res
    return prof
