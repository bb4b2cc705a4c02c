"""What a picture of a trace needs: per-ring time series and exact value distributions.

:func:`run_series` reads an :class:`~kvmtrace.core.sources.EventSource` once, batch by batch
(bounded memory), and returns a :class:`RunSeries`; :func:`side_series` does so for each of
a list of trace paths (one side of ``kvmtrace compare``: a single trace is a list of one, a
benchmark bundle a list of its repetitions).

Time series, per ring index (``struct kvm_dirty_ring.index``, the vCPU index; rings of
several VMs with one index add up, as in :mod:`.profile`), on bins of ``width_ns`` from the
trace's first event (the width starts at 1 ms and doubles, merging bins pairwise, whenever
the trace would need more than :data:`MAX_BINS` bins):

- ``pushes``: kvm_dirty_ring_push events per bin;
- ``max_used``: the largest ``dirty_index - reset_index`` (u32, entries) one push or reset
  event carried in the bin, -1 where the bin has none (the ring's fill);
- ``used_sum``: the sum of ``dirty_index - reset_index`` over the bin's push events
  (``used_sum / pushes`` is the ring's mean fill as the vCPU pushed);
- ``entries_reset``: entries collected by the resets of the bin: each kvm_dirty_ring_reset
  event's ``reset_index`` past the ring's previous reset event's (the first: past the ring's
  first event's), u32 arithmetic; a ring's bins add up to the ring's ``reset_index`` advance
  over the trace (:class:`~kvmtrace.analysis.aggregate.Aggregator`'s ``entries_reset``
  whenever the trace ends with a reset event or no push after it carries a newer value);
- ``resets``: kvm_dirty_ring_reset events per bin.

Distributions, exact (every value up to ``cap`` per distribution, then a uniform sample,
flagged; :class:`~kvmtrace.analysis.distribution.Reservoir`): stall ns per ring index and
for ``"all"``, the very values ``compare`` judges (:class:`~.profile.StallCollector`: the
``value`` of Kind.STALL events, exit 31 to the vCPU's next KVM_RUN; in text traces, which
have none, each soft-full exit to the ring's next push, and :attr:`RunSeries.stall_source`
says which), and reset latency ns (Kind.RESET_LAT, one per KVM_RESET_DIRTY_RINGS ioctl;
recordings only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.events import Kind, vm_keys
from ..core.kvm_abi import U32_MASK
from ..core.sources import EventSource
from ..errors import UsageError
from .distribution import DEFAULT_CAP, Reservoir
from .profile import ALL, STALL_EVENTS, STALL_EXIT_TO_PUSH, StallCollector

__all__ = ["FIRST_WIDTH_NS", "MAX_BINS", "RingSeries", "RunSeries", "run_series",
           "side_series"]

FIRST_WIDTH_NS = 1_000_000  #: bin width to start from, ns
MAX_BINS = 2048  #: bins per series at most; the width doubles beyond
_MASK = np.int64(U32_MASK)


@dataclass
class RingSeries:
    """One ring index's bins (int64 arrays of one length, bin i = [i*w, (i+1)*w) ns)."""

    pushes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    max_used: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    used_sum: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    entries_reset: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    resets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def _grow(self, n: int) -> None:
        have = len(self.pushes)
        if n <= have:
            return
        pad = n - have
        self.pushes = np.concatenate((self.pushes, np.zeros(pad, np.int64)))
        self.max_used = np.concatenate((self.max_used, np.full(pad, -1, np.int64)))
        self.used_sum = np.concatenate((self.used_sum, np.zeros(pad, np.int64)))
        self.entries_reset = np.concatenate((self.entries_reset, np.zeros(pad, np.int64)))
        self.resets = np.concatenate((self.resets, np.zeros(pad, np.int64)))

    def merged(self, factor: int) -> RingSeries:
        """The same series on bins ``factor`` times wider (the last one padded)."""
        if factor == 1:
            return self
        n = -(-len(self.pushes) // factor) * factor
        out = RingSeries(self.pushes, self.max_used, self.used_sum, self.entries_reset,
                         self.resets)
        out._grow(n)

        def fold(a: np.ndarray, how: str) -> np.ndarray:
            return getattr(a.reshape(-1, factor), how)(axis=1)

        return RingSeries(fold(out.pushes, "sum"), fold(out.max_used, "max"),
                          fold(out.used_sum, "sum"), fold(out.entries_reset, "sum"),
                          fold(out.resets, "sum"))

    def _halve(self) -> None:
        """Merge bins pairwise (the width doubles)."""
        m = self.merged(2)
        self.pushes, self.max_used, self.used_sum = m.pushes, m.max_used, m.used_sum
        self.entries_reset, self.resets = m.entries_reset, m.resets


@dataclass
class RunSeries:
    """One trace: its series per ring index and its distributions."""

    path: str
    kind: str  #: SourceMeta.kind: "recording", "ftrace", "perf-script"
    events: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    width_ns: int = FIRST_WIDTH_NS  #: bin width of every series of this trace
    rings: dict[int, RingSeries] = field(default_factory=dict)
    stall_ns: dict[int | str, Reservoir] = field(default_factory=dict)  #: index or ALL
    #: STALL_EVENTS, STALL_EXIT_TO_PUSH (text traces) or None (no stalls)
    stall_source: str | None = None
    reset_lat_ns: Reservoir = field(default_factory=Reservoir)
    lost_events: int = 0
    truncated: bool = False

    @property
    def span_ns(self) -> int:
        if self.first_ns is None or self.last_ns is None:
            return 0
        return self.last_ns - self.first_ns

    def stalls(self, ring: int | str = ALL) -> np.ndarray:
        """The stall values (ns) of a ring index or of ALL; empty when none."""
        res = self.stall_ns.get(ring)
        return res.values if res is not None else np.zeros(0, np.int64)


class _Feeder:
    """Per (pid, vm, ring) reset_index tracking across batches, into a RunSeries."""

    def __init__(self, run: RunSeries, cap: int, max_bins: int) -> None:
        self.run = run
        self.cap = cap
        self.max_bins = max_bins
        self._reset: dict[tuple[int, int, int], int] = {}  # last reset's reset_index
        self.stalls = StallCollector(cap)

    def feed(self, ev: np.ndarray) -> None:
        run = self.run
        if run.first_ns is None:
            run.first_ns = int(ev["ts"][0])
        run.last_ns = int(ev["ts"][-1])
        run.events += len(ev)
        kinds = ev["kind"]
        self._widen(int(ev["ts"][-1]) - run.first_ns)
        self.stalls.feed(ev)
        run.reset_lat_ns.add(ev["value"][kinds == Kind.RESET_LAT])
        ring_ev = ev[(kinds == Kind.PUSH) | (kinds == Kind.RESET)]
        if len(ring_ev) == 0:
            return
        # group by (pid, vm, ring) through integer keys (sorting records is ~20x slower)
        vms, vm_idx = np.unique(vm_keys(ring_ev), return_inverse=True)
        ring = ring_ev["ring"].astype(np.int64)
        r0 = int(ring.min())
        span = int(ring.max()) - r0 + 1
        groups, inverse = np.unique(vm_idx.ravel().astype(np.int64) * span + (ring - r0),
                                    return_inverse=True)
        order = np.argsort(inverse.ravel(), kind="stable")
        bounds = np.searchsorted(inverse.ravel()[order], np.arange(1, len(groups)))
        for g, part in zip(groups.tolist(), np.split(order, bounds), strict=True):
            vk = int(vms[g // span])
            key = (vk >> 32, vk & U32_MASK, g % span + r0)  # (pid, vm as u32, ring index)
            self._ring(key, ring_ev[part])

    def _widen(self, offset_ns: int) -> None:
        run = self.run
        while offset_ns // run.width_ns >= self.max_bins:
            run.width_ns *= 2
            for rs in run.rings.values():
                rs._halve()

    def _ring(self, key: tuple[int, int, int], ev: np.ndarray) -> None:
        run = self.run
        rs = run.rings.get(key[2])
        if rs is None:
            rs = run.rings[key[2]] = RingSeries()
        assert run.first_ns is not None
        idx = ((ev["ts"].astype(np.int64) - run.first_ns) // run.width_ns).astype(np.int64)
        rs._grow(int(idx[-1]) + 1)
        is_push = ev["kind"] == Kind.PUSH
        rs.pushes += np.bincount(idx[is_push], minlength=len(rs.pushes))
        rs.resets += np.bincount(idx[~is_push], minlength=len(rs.resets))
        used = (ev["dirty_index"].astype(np.int64) - ev["reset_index"].astype(np.int64)) & _MASK
        np.maximum.at(rs.max_used, idx, used)
        rs.used_sum += np.bincount(idx[is_push], weights=used[is_push],
                                   minlength=len(rs.used_sum)).astype(np.int64)
        # entries each reset collected: its reset_index past the ring's previous reset's
        # (the first one: past the ring's first event's), u32 arithmetic
        ri = ev["reset_index"].astype(np.int64)
        prev = self._reset.get(key, int(ri[0]))
        at = ri[~is_push]
        if len(at):
            step = (at - np.concatenate(([prev], at[:-1]))) & _MASK
            step = np.where(step > 0x7FFFFFFF, 0, step)
            rs.entries_reset += np.bincount(idx[~is_push], weights=step,
                                            minlength=len(rs.entries_reset)).astype(np.int64)
            prev = int(at[-1])
        self._reset[key] = prev


def run_series(source: EventSource, *, path: str = "", cap: int = DEFAULT_CAP,
               max_bins: int = MAX_BINS) -> RunSeries:
    """Read ``source`` once into a :class:`RunSeries` (distributions keep at most ``cap``
    values each, series at most ``max_bins`` bins)."""
    run = RunSeries(path=path, kind=source.meta.kind, reset_lat_ns=Reservoir(cap))
    feeder = _Feeder(run, cap, max_bins)
    for batch in source.batches():
        if len(batch):
            feeder.feed(batch)
    run.lost_events = int(source.lost)
    stalls = feeder.stalls
    run.stall_ns = stalls.measured or stalls.derived
    if run.stall_ns:
        run.stall_source = STALL_EVENTS if stalls.measured else STALL_EXIT_TO_PUSH
    run.truncated = bool(source.truncated)
    return run


def side_series(paths: Sequence[str | os.PathLike[str]], *, ring_entries: int | None = None,
                ring_bytes: int | None = None, cap: int = DEFAULT_CAP,
                skip_damaged: bool = False) -> list[RunSeries]:
    """:func:`run_series` of each trace of one side (recordings, tracefs or ``perf script``
    text, detected), in order. A malformed trace: UsageError naming it (``skip_damaged``:
    a recording's damaged blocks are skipped, as ``--skip-damaged``)."""
    from ..source.detect import open_source

    out = []
    for p in paths:
        src = open_source(p, ring_entries=ring_entries, ring_bytes=ring_bytes,
                          skip_damaged=skip_damaged)
        try:
            out.append(run_series(src, path=os.fspath(p), cap=cap))
        except ValueError as err:
            raise UsageError(f"{p}: {err}", "check the file is complete") from None
        finally:
            src.close()
    return out
