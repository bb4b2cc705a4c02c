"""Per-interval rates and percentiles from two cumulative :class:`Snapshot` objects.

Rates are the counter delta divided by the interval in seconds; percentiles are those of the
interval, taken from the delta of the log2 ns histograms (:func:`hist_percentile`, so a
percentile is the upper bound of its power-of-two bucket). Cumulative fields stay cumulative
(since the source started, or since ``baseline`` when the view was told to reset counters).

KVM_RESET_DIRTY_RINGS latency is VM-wide: it comes from the snapshot's per-VM table
(:attr:`Snapshot.vm_counters`); a VM's rows and each of its ring rows show the VM's
percentile. A ring index below 0 ("the VM, ring unknown") becomes a ring row only when it
carries ring events (pushes, exits, resets, stalls).

Dirty rate in QEMU's terms (:func:`dirty_rate_mbps`): MB/s where MB is MiB of 4 KiB guest
pages, i.e. entries pushed per second x 4096 / 2**20. One ``struct kvm_dirty_gfn`` entry is
one dirtied 4 KiB page, so this is what QEMU's ``calc-dirty-rate`` (mode ``dirty-ring``)
reports per vCPU as ``vcpu-dirty-rate`` and for the VM as ``dirty-rate`` (QEMU truncates
to an integer; kvmtrace keeps the fraction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.counters import (
    HIST_BUCKETS,
    RingCounters,
    RingKey,
    Snapshot,
    VmCounters,
    VmInfo,
    VmKey,
    hist_percentile,
)
from .stuck import worst

if TYPE_CHECKING:
    from .replay.workingset import RingWs

__all__ = ["RingRates", "VmRates", "Interval", "compute_interval", "subtract",
           "DIRTY_PAGE_BYTES", "dirty_rate_mbps", "SpanRate", "span_rates", "window_rates"]

#: bytes of guest memory one dirty-ring entry stands for (a 4 KiB page on x86)
DIRTY_PAGE_BYTES = 4096


def dirty_rate_mbps(entries_per_s: float | None) -> float | None:
    """QEMU's dirty rate of ``entries_per_s`` (ring entries pushed per second):
    entries pushed per second x 4096 / 2**20, in MB/s (MiB of 4 KiB pages per second).
    None stays None (rate unknown)."""
    if entries_per_s is None:
        return None
    return entries_per_s * DIRTY_PAGE_BYTES / (1 << 20)


@dataclass(frozen=True)
class SpanRate:
    """Pushes over an active span (first to last push, ns of the trace's clock): the dirty
    rate of a ring or a VM over a recording."""

    pushes: int
    first_ns: int | None
    last_ns: int | None

    @property
    def seconds(self) -> float | None:
        """Length of the span; None with fewer than two distinct push times."""
        if self.first_ns is None or self.last_ns is None or self.last_ns <= self.first_ns:
            return None
        return (self.last_ns - self.first_ns) / 1e9

    @property
    def push_rate(self) -> float | None:
        s = self.seconds
        return None if s is None else self.pushes / s

    @property
    def dirty_rate_mbps(self) -> float | None:
        """Entries pushed per second over the span x 4096 / 2**20 (QEMU's MB/s)."""
        return dirty_rate_mbps(self.push_rate)


def span_rates(rings: dict[tuple[int, int, int], RingWs]
               ) -> tuple[dict[tuple[int, int, int], SpanRate], dict[tuple[int, int], SpanRate]]:
    """Per ring (pid, vm, index) and per VM (pid, vm): pushes over the active span (a VM's
    span runs from its first ring's first push to its last ring's last push)."""
    per_ring = {k: SpanRate(w.pushes, w.first_ns, w.last_ns) for k, w in rings.items()}
    per_vm: dict[tuple[int, int], SpanRate] = {}
    for (pid, vm, _), r in sorted(per_ring.items()):
        old = per_vm.get((pid, vm))
        if old is None:
            per_vm[(pid, vm)] = r
            continue
        firsts = [x for x in (old.first_ns, r.first_ns) if x is not None]
        lasts = [x for x in (old.last_ns, r.last_ns) if x is not None]
        per_vm[(pid, vm)] = SpanRate(old.pushes + r.pushes, min(firsts, default=None),
                                     max(lasts, default=None))
    return per_ring, per_vm


def window_rates(ws: RingWs, window_ns: int) -> list[tuple[int, float]]:
    """(window index, dirty rate MB/s) of each window the ring pushed in: the window's
    entries pushed per second x 4096 / 2**20 (a window is ``window_ns`` long)."""
    return [(w, dirty_rate_mbps(n * 1e9 / window_ns) or 0.0) for w, n, _ in ws.windows]


@dataclass
class RingRates:
    """One ring (struct kvm_dirty_ring) over one interval. Counts in entries or events."""

    pid: int
    vm: int
    index: int  # kvm_dirty_ring.index (vCPU index); -1 unknown
    size: int | None  # entries; None unknown
    used: int  # dirty_index - reset_index now, entries
    max_used: int
    pushes: int  # cumulative
    soft_full_exits: int
    resets: int
    entries_reset: int
    lost: int
    stall_ns: int  # cumulative total, ns
    interval_s: float
    d_pushes: int  # deltas over the interval
    d_soft_full_exits: int
    d_resets: int
    d_entries_reset: int
    d_lost: int
    stall_p50_ns: int | None  # interval percentiles (log2 bucket upper bound), None if none
    stall_p99_ns: int | None
    reset_p99_ns: int | None  # the VM's KVM_RESET_DIRTY_RINGS latency (a vm ioctl)
    stall_hist: list[int] = field(default_factory=list)  # interval delta
    stall_hist_total: list[int] = field(default_factory=list)  # cumulative
    stranded: int = 0  # of lost pages: stranded by a stuck ring (kvmtrace.analysis.stuck)
    stuck: str | None = None  # why the ring is flagged stuck, None when it is not

    @property
    def fill_pct(self) -> float | None:
        """used / size in percent; None when the size is unknown."""
        return 100.0 * self.used / self.size if self.size else None

    @property
    def push_rate(self) -> float:
        """Pushes per second over the interval (0 for a zero-length interval)."""
        return _rate(self.d_pushes, self.interval_s)

    @property
    def dirty_rate_mbps(self) -> float:
        """Dirty rate in QEMU's terms over the interval: entries pushed per second x 4096
        / 2**20 (MB/s of 4 KiB pages; :func:`dirty_rate_mbps`)."""
        return self.push_rate * DIRTY_PAGE_BYTES / (1 << 20)

    @property
    def exit_rate(self) -> float:
        return _rate(self.d_soft_full_exits, self.interval_s)

    @property
    def reset_rate(self) -> float:
        return _rate(self.d_resets, self.interval_s)

    @property
    def lost_rate(self) -> float:
        return _rate(self.d_lost, self.interval_s)

    @property
    def entries_per_reset(self) -> float | None:
        """Entries reset per reset event in the interval; None without resets."""
        return self.d_entries_reset / self.d_resets if self.d_resets > 0 else None


@dataclass
class VmRates(RingRates):
    """Totals of one VM: sums of its rings (size: per ring when all agree, else None), and
    its KVM_RESET_DIRTY_RINGS latencies over the interval (log2 ns buckets)."""

    reset_lat_hist: list[int] = field(default_factory=list)  # interval delta
    comm: str = ""
    name: str | None = None
    ring_bytes: int | None = None
    rings: int = 0

    @property
    def fill_pct(self) -> float | None:
        """used over the entries of all the VM's rings, in percent; None when unknown."""
        return 100.0 * self.used / (self.size * self.rings) if self.size and self.rings else None


@dataclass
class Interval:
    time_ns: int
    interval_s: float
    rings: list[RingRates]
    vms: list[VmRates]
    lost_events: int  # cumulative
    lost_events_rate: float
    #: VMs with a dirty ring of known size (KVM_ENABLE_CAP seen) but no ring event since
    #: tracing began: no push, exit or reset. For QEMU this is dirty logging off: it pushes
    #: only during a migration, calc-dirty-rate or a dirty limit.
    idle: list[VmInfo] = field(default_factory=list)

    def total(self) -> VmRates:
        """All VMs together."""
        total = _total(list(self.vms), -1, -1, VmInfo(pid=-1, vm=-1), self.interval_s,
                       _sum_hist([v.reset_lat_hist for v in self.vms]))
        total.rings = sum(v.rings for v in self.vms)
        return total


def _delta_hist(cur: list[int], prev: list[int] | None) -> list[int]:
    if prev is None:
        return list(cur)
    return [max(0, a - b) for a, b in zip(cur, prev, strict=True)]


def _rate(delta: int, seconds: float) -> float:
    return delta / seconds if seconds > 0 else 0.0


def _ring_rates(key: RingKey, cur: RingCounters, prev: RingCounters | None, dt: float,
                reset_p99_ns: int | None) -> RingRates:
    p = prev or RingCounters()
    stall = _delta_hist(cur.stall_hist, prev.stall_hist if prev else None)
    return RingRates(
        pid=key.pid,
        vm=key.vm,
        index=key.ring,
        size=cur.size,
        used=cur.used,
        max_used=cur.max_used,
        pushes=cur.pushes,
        soft_full_exits=cur.soft_full_exits,
        resets=cur.resets,
        entries_reset=cur.entries_reset,
        lost=cur.lost,
        stall_ns=cur.stall_ns,
        interval_s=dt,
        d_pushes=cur.pushes - p.pushes,
        d_soft_full_exits=cur.soft_full_exits - p.soft_full_exits,
        d_resets=cur.resets - p.resets,
        d_entries_reset=cur.entries_reset - p.entries_reset,
        d_lost=cur.lost - p.lost,
        stall_p50_ns=hist_percentile(stall, 0.50),
        stall_p99_ns=hist_percentile(stall, 0.99),
        reset_p99_ns=reset_p99_ns,
        stall_hist=stall,
        stall_hist_total=list(cur.stall_hist),
        stranded=cur.stranded,
        stuck=cur.stuck,
    )


def _sum_hist(hists: list[list[int]]) -> list[int]:
    out = [0] * HIST_BUCKETS
    for h in hists:
        for i, n in enumerate(h):
            out[i] += n
    return out


def _vm_reset_hist(key: VmKey, cur: Snapshot, prev: Snapshot | None) -> list[int]:
    """The VM's KVM_RESET_DIRTY_RINGS latency histogram over prev -> cur."""
    c = cur.vm_counters.get(key)
    if c is None:
        return [0] * HIST_BUCKETS
    p = prev.vm_counters.get(key) if prev is not None else None
    return _delta_hist(c.reset_lat_hist, p.reset_lat_hist if p is not None else None)


def _total(parts: list[RingRates], pid: int, vm: int, info: VmInfo, dt: float,
           rlat: list[int]) -> VmRates:
    sizes = {r.size for r in parts if r.index >= 0}
    stall = _sum_hist([r.stall_hist for r in parts])
    return VmRates(
        pid=pid,
        vm=vm,
        index=-1,
        size=sizes.pop() if len(sizes) == 1 else None,
        used=sum(r.used for r in parts),
        max_used=max((r.max_used for r in parts), default=0),
        pushes=sum(r.pushes for r in parts),
        soft_full_exits=sum(r.soft_full_exits for r in parts),
        resets=sum(r.resets for r in parts),
        entries_reset=sum(r.entries_reset for r in parts),
        lost=sum(r.lost for r in parts),
        stall_ns=sum(r.stall_ns for r in parts),
        interval_s=dt,
        d_pushes=sum(r.d_pushes for r in parts),
        d_soft_full_exits=sum(r.d_soft_full_exits for r in parts),
        d_resets=sum(r.d_resets for r in parts),
        d_entries_reset=sum(r.d_entries_reset for r in parts),
        d_lost=sum(r.d_lost for r in parts),
        stall_p50_ns=hist_percentile(stall, 0.50),
        stall_p99_ns=hist_percentile(stall, 0.99),
        reset_p99_ns=hist_percentile(rlat, 0.99),
        stall_hist=stall,
        reset_lat_hist=rlat,
        stall_hist_total=_sum_hist([r.stall_hist_total for r in parts]),
        stranded=sum(r.stranded for r in parts),
        stuck=worst(r.stuck for r in parts),
        comm=info.comm,
        name=info.name,
        ring_bytes=info.ring_bytes,
        rings=sum(1 for r in parts if _is_ring_row(r)),
    )


def _is_ring_row(r: RingRates) -> bool:
    return r.index >= 0 or bool(r.pushes or r.soft_full_exits or r.resets or r.stall_ns)


def subtract(cur: Snapshot, base: Snapshot) -> Snapshot:
    """``cur`` with the cumulative counters of ``base`` taken off (the view's "reset
    counters"). Indices, used, size and max_used stay as they are (max_used is a maximum
    since the start, not resettable from user space)."""
    rings: dict[RingKey, RingCounters] = {}
    for key, c in cur.rings.items():
        b = base.rings.get(key)
        if b is None:
            rings[key] = c
            continue
        rings[key] = RingCounters(
            pushes=c.pushes - b.pushes,
            resets=c.resets - b.resets,
            entries_reset=c.entries_reset - b.entries_reset,
            soft_full_exits=c.soft_full_exits - b.soft_full_exits,
            dirty_index=c.dirty_index,
            reset_index=c.reset_index,
            max_used=c.max_used,
            lost=c.lost - b.lost,
            stranded=c.stranded - b.stranded,
            stuck=c.stuck,
            size=c.size,
            stall_hist=_delta_hist(c.stall_hist, b.stall_hist),
            stall_ns=c.stall_ns - b.stall_ns,
        )
    vm_counters: dict[VmKey, VmCounters] = {}
    for key, v in cur.vm_counters.items():
        w = base.vm_counters.get(key)
        vm_counters[key] = v if w is None else VmCounters(
            reset_ioctls=v.reset_ioctls - w.reset_ioctls,
            reset_ns=v.reset_ns - w.reset_ns,
            reset_lat_hist=_delta_hist(v.reset_lat_hist, w.reset_lat_hist),
        )
    return Snapshot(
        time_ns=cur.time_ns,
        rings=rings,
        vms=cur.vms,
        vm_counters=vm_counters,
        lost_events=cur.lost_events - base.lost_events,
    )


def compute_interval(prev: Snapshot | None, cur: Snapshot, *, pid: int = 0) -> Interval:
    """Rates over ``prev`` -> ``cur`` (``prev`` None: since the start, interval 0 s).

    ``pid`` keeps only that VMM process (0 = all). Rings are ordered by (pid, vm, index);
    VMs by (pid, vm).
    """
    dt = (cur.time_ns - prev.time_ns) / 1e9 if prev is not None else 0.0
    dt = max(dt, 0.0)
    per_vm: dict[VmKey, list[RingRates]] = {}
    reset_hists: dict[VmKey, list[int]] = {}
    for key in sorted(cur.rings):
        if pid and key.pid != pid:
            continue
        vkey = VmKey(key.pid, key.vm)
        if vkey not in reset_hists:
            reset_hists[vkey] = _vm_reset_hist(vkey, cur, prev)
        old = prev.rings.get(key) if prev is not None else None
        per_vm.setdefault(vkey, []).append(
            _ring_rates(key, cur.rings[key], old, dt, hist_percentile(reset_hists[vkey], 0.99))
        )
    rings: list[RingRates] = []
    vms: list[VmRates] = []
    for (vpid, vm), parts in per_vm.items():
        info = cur.vms.get((vpid, vm)) or VmInfo(pid=vpid, vm=vm)
        total = _total(parts, vpid, vm, info, dt, reset_hists[VmKey(vpid, vm)])
        rings += [r for r in parts if _is_ring_row(r)]
        if total.rings:
            vms.append(total)
    lost_prev = prev.lost_events if prev is not None else 0
    shown = {(v.pid, v.vm) for v in vms}
    idle = [info for key, info in sorted(cur.vms.items())
            if key not in shown and info.ring_bytes and (not pid or key[0] == pid)]
    return Interval(
        time_ns=cur.time_ns,
        interval_s=dt,
        rings=rings,
        vms=vms,
        lost_events=cur.lost_events,
        lost_events_rate=_rate(cur.lost_events - lost_prev, dt),
        idle=idle,
    )
