"""What a replay finds per ring: :class:`Anomaly` and :class:`RingResult`; and the state
types both replays keep per ring: :class:`SoftEpisode`, :class:`PendingReset`.

Shared by the reference replay (:mod:`kvmtrace.testing.reference`) and the fast one
(:mod:`kvmtrace.analysis.replay`) so that both can be compared field by field. A ring is
keyed by (VMM pid, VM fd, ring index = ``kvm_dirty_ring.index`` = vCPU index); pid 0 and
vm -1 mean unknown (plain ftrace/perf text).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.counters import HIST_BUCKETS
from .reservoir import Reservoir

__all__ = ["AnomalyKind", "Anomaly", "RingResult", "RingId", "LIST_CAP", "Durations",
           "SoftEpisode", "PendingReset"]

RingId = tuple[int, int, int]  # (pid, vm, ring index)

#: overwritten entries an overflow anomaly lists at most (the count is always exact)
LIST_CAP = 100_000
PENDING_MAX = 4096  #: durations added one by one, buffered before they join the sample


class AnomalyKind(enum.StrEnum):
    OVERFLOW = "overflow"  #: used > size: unharvested entries overwritten (lost pages)
    NO_EXIT = "no_exit"  #: pushes past the soft limit and no soft-full exit followed
    GAP = "gap"  #: dirty_index/reset_index jumped: lost events (the trace dropped some)
    RESET_BEYOND = "reset_beyond"  #: reset_index passed dirty_index
    BACKWARDS = "backwards"  #: an index went back
    LIVELOCK = "livelock"  #: repeated soft-full exits with no reset progress
    STUCK = "stuck"  #: reset_index on a cleared entry with entries pushed: never reset again


@dataclass
class Anomaly:
    """One finding. ``time_ns``: the event's timestamp (ns, the trace's clock);
    ``dirty_index``/``reset_index``: the ring's indices at that event; ``count``: how many
    (entries, events or exits, by kind); ``entries``: (slot, offset) overwritten (overflow);
    ``extra``: kind-specific numbers used by :attr:`detail`."""

    kind: AnomalyKind
    ring: RingId
    time_ns: int
    dirty_index: int
    reset_index: int
    count: int = 0
    entries: list[tuple[int, int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def detail(self) -> str:
        """One plain sentence."""
        x, n = self.extra, self.count
        k = self.kind
        if k is AnomalyKind.OVERFLOW:
            shown = ", ".join(f"({s}, {o:#x})" for s, o in self.entries[:4])
            more = f" and {n - 4} more" if n > 4 else ""
            return (
                f"ring overflow: used reached {x['max_used']} > size {x['size']}, "
                f"{n} unharvested entries overwritten (lost pages): {shown}{more}"
            )
        if k is AnomalyKind.NO_EXIT:
            return (
                f"{n} pushes past the soft limit {x['soft_limit']} (used up to "
                f"{x['max_used']}) and no soft-full exit: the vCPU kept running on a "
                f"soft-full ring"
            )
        if k is AnomalyKind.GAP:
            what = x["index"]
            return (
                f"{what} jumped from {x['expected']:#x} to {x['got']:#x} at a {x['event']} "
                f"event: {n} lost {'push' if what == 'dirty_index' else 'reset'} "
                f"event(s) (the trace dropped them)"
            )
        if k is AnomalyKind.RESET_BEYOND:
            return (
                f"reset_index {self.reset_index:#x} passed dirty_index {self.dirty_index:#x} "
                f"by {n}: the VMM marked entries it never got as harvested"
            )
        if k is AnomalyKind.BACKWARDS:
            return (
                f"{x['index']} went backwards: {x['before']:#x} then {x['after']:#x} at a "
                f"{x['event']} event (the model resynced to the event)"
            )
        if k is AnomalyKind.STUCK:
            return (
                f"ring stuck: reset_index {self.reset_index:#x} points at an entry a reset "
                f"already cleared while {x['used']} are pushed (an overflow's harvest ran "
                f"into the next lap): {n} entries stranded, never to be harvested or reset"
            )
        return (
            f"{n} soft-full exits without reset progress (reset_index stuck at "
            f"{self.reset_index:#x}, used {x['used']}): the VMM re-enters a full ring"
        )

    def key(self) -> tuple[Any, ...]:
        """Everything that identifies the finding (for comparing two replays)."""
        return (self.kind.value, self.ring, self.time_ns, self.dirty_index, self.reset_index,
                self.count, tuple(self.entries), tuple(sorted(self.extra.items())))


@dataclass
class Durations:
    """Count, total, max, log2 histogram and exact values of durations in ns.

    The histogram (bucket i: 2**i <= v < 2**(i+1), bucket 0 also holds 0) is bounded
    however many are added; the values are kept in a :class:`~.reservoir.Reservoir`: every
    one up to :data:`~.reservoir.DEFAULT_CAP`, a uniform sample beyond (:attr:`sampled`).
    :meth:`quantile_ns` is a value that occurred, never a bucket bound.
    Equality and :meth:`key` compare count, total, max and histogram only.
    """

    count: int = 0
    total_ns: int = 0
    max_ns: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * HIST_BUCKETS)
    _sample: Reservoir | None = field(default=None, init=False, repr=False, compare=False)
    _pending: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def add(self, ns: int) -> None:
        ns = max(0, int(ns))
        self.count += 1
        self.total_ns += ns
        self.max_ns = max(self.max_ns, ns)
        self.hist[min(max(ns.bit_length() - 1, 0), HIST_BUCKETS - 1)] += 1
        self._pending.append(ns)
        if len(self._pending) >= PENDING_MAX:
            self._flush()

    def add_many(self, ns: np.ndarray) -> None:
        """Add an array of durations (ns, < 2**53); same result as add() one by one."""
        if not len(ns):
            return
        v = np.maximum(ns.astype(np.int64), 0)
        self.count += len(v)
        self.total_ns += int(v.sum())
        self.max_ns = max(self.max_ns, int(v.max()))
        b = np.frexp(v.astype(np.float64))[1] - 1
        b = np.clip(b, 0, HIST_BUCKETS - 1)
        for i, n in enumerate(np.bincount(b, minlength=HIST_BUCKETS)):
            self.hist[i] += int(n)
        self._flush()
        self._reservoir().add(v)

    def merge(self, other: Durations) -> None:
        """Add another Durations' counts and values (e.g. of the same ring from another
        worker); the values added are ``other``'s kept ones."""
        self.count += other.count
        self.total_ns += other.total_ns
        self.max_ns = max(self.max_ns, other.max_ns)
        self.hist = [a + b for a, b in zip(self.hist, other.hist, strict=True)]
        self._flush()
        self._reservoir().add(other.values)

    def _reservoir(self) -> Reservoir:
        if self._sample is None:
            self._sample = Reservoir()
        return self._sample

    def _flush(self) -> None:
        if self._pending:
            self._reservoir().add(np.asarray(self._pending, dtype=np.int64))
            self._pending.clear()

    @property
    def values(self) -> np.ndarray:
        """The durations kept (ns, int64, in the order added; all of them unless
        :attr:`sampled`)."""
        self._flush()
        return self._sample.values if self._sample is not None else np.empty(0, np.int64)

    @property
    def sampled(self) -> bool:
        """True when more durations were added than kept (percentiles are of a sample)."""
        return self.count > len(self.values)

    def mean_ns(self) -> float | None:
        return self.total_ns / self.count if self.count else None

    def quantile_ns(self, q: float) -> int | None:
        """The q-quantile (0..1) in ns: the smallest duration with at least q of them at or
        below it (numpy's ``inverted_cdf``), a value that occurred; None when empty."""
        v = self.values
        if not len(v):
            return None
        return int(np.quantile(v, q, method="inverted_cdf"))

    def bucket_bound_ns(self, q: float) -> int | None:
        """Upper bound (ns) of the log2 bucket holding quantile q (0..1), capped at the max:
        what the histogram alone can say; None when empty."""
        if not self.count:
            return None
        seen = 0
        for i, n in enumerate(self.hist):
            seen += n
            if n and seen >= q * self.count:
                return min(1 << (i + 1), self.max_ns)
        return self.max_ns

    def key(self) -> tuple[int, int, int, tuple[int, ...]]:
        return (self.count, self.total_ns, self.max_ns, tuple(self.hist))


@dataclass
class RingResult:
    """Per ring totals over the whole replay (``struct kvm_dirty_ring`` of one vCPU)."""

    ring: RingId
    pushes: int = 0  #: kvm_dirty_ring_push events seen
    lost_pushes: int = 0  #: pushes the trace did not show (dirty_index gaps)
    resets: int = 0  #: kvm_dirty_ring_reset events
    entries_reset: int = 0  #: sum of reset_index advances (entries collected)
    soft_full_exits: int = 0  #: kvm_dirty_ring_exit events (or exit reason 31)
    max_used: int = 0  #: max of dirty_index - reset_index seen on any event
    size: int | None = None  #: entries; None if unknown
    size_source: str = "unknown"  #: "trace", "meta", "inferred", "unknown"
    dirty_index: int = 0  #: last
    reset_index: int = 0  #: last
    overwritten: int = 0  #: entries overwritten before harvest (lost pages)
    stranded: int = 0  #: entries pushed and never collectable: the ring ended stuck
    stuck: bool = False  #: at the end, reset_index on a cleared entry while used > 0
    #: distinct (slot, offset) among overwritten + stranded entries whose latest push was
    #: never collected, with how many of their entries were overwritten or stranded;
    #: sorted, at most LIST_CAP
    lost_pages: list[tuple[int, int, int]] = field(default_factory=list)
    lost_page_count: int = 0  #: len(lost_pages) before the cap
    harvested: int = 0  #: entries collected by resets whose content the model knew
    harvested_unknown: int = 0  #: entries collected whose content the trace never showed
    harvest_sum1: int = 0  #: order-independent multiset hash of harvested (slot, offset)
    harvest_sum2: int = 0
    first_ns: int | None = None
    last_ns: int | None = None
    stalls: Durations = field(default_factory=Durations)  #: KT_STALL events (ns)
    exit_to_push: Durations = field(default_factory=Durations)  #: exit -> next push (ns)

    def compare_key(self) -> tuple[Any, ...]:
        return (self.ring, self.pushes, self.lost_pushes, self.resets, self.entries_reset,
                self.soft_full_exits, self.max_used, self.size, self.dirty_index,
                self.reset_index, self.overwritten, self.stranded, self.stuck,
                tuple(self.lost_pages), self.lost_page_count, self.harvested,
                self.harvested_unknown,
                self.harvest_sum1, self.harvest_sum2, self.first_ns, self.last_ns,
                self.stalls.key(), self.exit_to_push.key())


@dataclass
class SoftEpisode:
    """One soft-limit episode of a ring: ``used >= soft_limit`` (``size - reserve``
    entries of ``struct kvm_dirty_ring``) from the push that reached the limit until a
    reset brings ``used`` below it. Ring state of both replays, not a result.

    ``exited``: a soft-full exit (``KVM_EXIT_DIRTY_RING_FULL``) happened in it; ``past``:
    pushes made at ``used > soft_limit`` before any exit; ``first``: (ts ns, dirty_index,
    reset_index) of the first of those; ``max_used``: the most entries used in it.
    """

    max_used: int
    exited: bool = False
    past: int = 0
    first: tuple[int, int, int] | None = None

    def add(self, *, exited: bool = False, past: int = 0, max_used: int = 0,
            first: tuple[int, int, int] | None = None) -> None:
        """Fold in more of the episode: exits, pushes past the limit (``first``: the
        first of them, kept only if none was seen before), the most used."""
        self.exited = self.exited or exited
        self.past += past
        self.max_used = max(self.max_used, max_used)
        if self.first is None:
            self.first = first


@dataclass
class PendingReset:
    """A ``reset_index`` advance that push events showed (the reset walk ran while the
    vCPU pushed) and no ``kvm_dirty_ring_reset`` event has confirmed yet: from ``start`` to
    ``to`` (u32 indices), first seen at ``ts`` (ns) with ``dirty_index`` then. Still
    pending at the end of the trace it is a gap on kernels before 6.16."""

    ts: int
    dirty_index: int
    start: int
    to: int
