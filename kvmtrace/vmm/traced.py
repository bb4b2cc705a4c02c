"""The trace-driven guest of ``kvmtrace workload --replay FILE``: each vCPU dirties the
(slot, offset) sequence one ring of a trace pushed.

Plan (:func:`plan_from_source`): the trace's push events, ring by ring (a ring is
(pid, vm fd, vCPU index)) in the trace's order, become one vCPU each (rings sorted by that
key, so a recording of a ``workload`` run maps ring i to vCPU i). Before a write the guest
harvests and resets (a *mark*, :data:`~.guest.MARK_PORT`) where

- the trace reset that ring: a ``kvm_dirty_ring_reset`` of the ring came after that many of
  its pushes (so the harvest points of the source are kept), and
- the page was already written since the vCPU's last mark: on a host where a page stays
  writable until its entry is reset (EPT/NPT with the dirty ring) a second write would push
  nothing, so the replay resets first. Where every guest write pushes (nested KVM, shadow
  paging) the mark only adds an exit.

Every write of the replay then pushes exactly one entry, so the replay pushes, per ring,
the trace's multiset of (slot, offset) (in the same order, ring by ring).

Layout (:class:`TraceLayout`), guest physical memory, 4 KiB pages, no paging:

- the code slot, at GPA 0, *not* dirty-logged (so it pushes nothing), slot id the lowest the
  trace does not use: page 0 the code, then one table per vCPU, u32 GPAs (bit 0: a mark;
  the first entry is always marked, so with ``--passes``/``--duration`` every pass starts
  with a harvest and pages the last pass wrote push again);
- one dirty-logged slot per slot id the trace pushed to, with the same id (address space 0
  only), ``max offset + 1`` pages, placed one after the other above the code slot.

Limits, each refused with a one-line error: at most :data:`MAX_TRACE_VCPUS` rings, at most
:data:`MAX_TRACE_WRITES` pushes, the whole layout within :data:`MAX_TRACE_SPAN` bytes of
guest physical memory (the guest addresses 32-bit physical memory; host memory is used
only for pages it writes).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..core.events import Kind
from ..core.sources import EventSource
from ..errors import UsageError
from ..host.kvm import PAGE_SIZE
from .guest import GuestCode, load_tables
from .vm import MemoryRegion

__all__ = ["MAX_TRACE_VCPUS", "MAX_TRACE_WRITES", "MAX_TRACE_SPAN", "TraceRing",
           "TracePlan", "plan_from_events", "plan_from_source", "TraceLayout"]

MAX_TRACE_VCPUS = 64  #: rings a replay runs (one vCPU each), as ``workload --vcpus``
MAX_TRACE_WRITES = 1 << 24  #: pushes a replay writes, all rings together (64 MiB of tables)
MAX_TRACE_SPAN = 3 << 30  #: guest physical bytes the replay layout may span (3 GiB)
_MARK = 1  #: bit 0 of a table entry: harvest and reset before this write


@dataclass(frozen=True, eq=False)
class TraceRing:
    """One ring of the trace: its key (pid, vm fd, vCPU index) there, the pushed
    ``slots`` (u32, ``as_id << 16 | id``) and ``offsets`` (u64, pages within the slot) in
    order, ``marks`` (bool: harvest and reset before this write) and ``resets``, the
    trace's resets of this ring that fell between two of its pushes."""

    key: tuple[int, int, int]
    slots: np.ndarray
    offsets: np.ndarray
    marks: np.ndarray
    resets: int

    def __len__(self) -> int:
        return len(self.slots)


@dataclass(frozen=True, eq=False)
class TracePlan:
    """What a replay runs: one :class:`TraceRing` per vCPU, the trace's ring size in
    entries (None: the trace does not say) and its name (for messages)."""

    rings: tuple[TraceRing, ...]
    ring_entries: int | None
    name: str

    @property
    def writes(self) -> int:
        return sum(len(r) for r in self.rings)

    @property
    def marks(self) -> int:
        return sum(int(r.marks.sum()) for r in self.rings)


def _marks(slots: np.ndarray, offsets: np.ndarray, reset_at: np.ndarray) -> np.ndarray:
    """Mark write i when the trace reset the ring after i pushes, or when its page was
    written since the last mark (its previous write is at or after that mark). Vectorised
    but for a walk over the repeats and resets, in order."""
    n = len(slots)
    marks = np.zeros(n, dtype=bool)
    resets = np.zeros(n, dtype=bool)
    resets[reset_at[(reset_at > 0) & (reset_at < n)]] = True
    key = (slots.astype(np.uint64) << np.uint64(40)) | offsets.astype(np.uint64)
    order = np.argsort(key, kind="stable")
    same = key[order[1:]] == key[order[:-1]]
    prev = np.full(n, -1, dtype=np.int64)
    prev[order[1:][same]] = order[:-1][same]
    last = 0
    candidates = np.flatnonzero(resets | (prev >= 0))
    for i, p, r in zip(candidates.tolist(), prev[candidates].tolist(),
                       resets[candidates].tolist(), strict=True):
        if r or p >= last:
            marks[i] = True
            last = i
    return marks


def plan_from_events(batches: Iterable[np.ndarray], name: str,
                     ring_entries: int | None = None) -> TracePlan:
    """Build the plan from EVENT_DTYPE batches (in the trace's order); only push and
    reset events are read. Raises UsageError (one line) for a trace the guest cannot run."""
    fields = ("pid", "vm", "ring", "slot", "value")
    cols: dict[str, list[np.ndarray]] = {f: [] for f in (*fields, "push")}
    total = 0
    for batch in batches:
        kind = batch["kind"]
        push = kind == Kind.PUSH
        keep = push | (kind == Kind.RESET)
        for f in fields:
            cols[f].append(batch[f][keep])
        cols["push"].append(push[keep])
        total += int(push.sum())
        if total > MAX_TRACE_WRITES:
            raise UsageError(f"{name} has more than {MAX_TRACE_WRITES} push events; "
                             "--replay takes at most that many",
                             "replay a shorter trace (record for less time)")
    if not total:
        raise UsageError(f"{name} has no kvm_dirty_ring_push events to replay",
                         "trace kvm:kvm_dirty_ring_push, or record a guest that writes")
    pid, vm, ring, slot, value, is_push = (np.concatenate(cols[f])
                                           for f in (*fields, "push"))
    if (ring < 0).any():
        raise UsageError(f"{name} has dirty-ring events without a ring (vCPU) index",
                         "trace with kvmtrace record, or ftrace/perf text of the events")
    space = slot[is_push] >> 16
    if space.any():
        raise UsageError(f"{name} pushes to address space {int(space.max())} (slot "
                         f"{int(slot[is_push].max()):#x}); the replay guest has only "
                         "address space 0", "replay a trace of a guest without SMM")
    vm_key = (pid.astype(np.uint64) << np.uint64(32)) | vm.astype(np.uint32)  # vm_keys
    _vms, vm_of = np.unique(vm_key, return_inverse=True)  # sorted by (pid, vm)
    uniq, inverse = np.unique(vm_of.astype(np.int64) << 32 | ring.astype(np.int64),
                              return_inverse=True)
    if len(uniq) > MAX_TRACE_VCPUS:
        raise UsageError(f"{name} has {len(uniq)} rings; --replay runs at most "
                         f"{MAX_TRACE_VCPUS} (one vCPU each)",
                         "replay a trace of fewer vCPUs (e.g. record -p PID of one VMM)")
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
    rings = []
    for i in range(len(uniq)):
        mine = order[bounds[i]:bounds[i + 1]]
        key = (int(pid[mine[0]]), int(vm[mine[0]]), int(ring[mine[0]]))
        push = is_push[mine]
        before = np.cumsum(push) - push  # pushes of this ring before each event
        reset_at = before[~push]
        slots = slot[mine[push]].astype(np.uint32)
        offsets = value[mine[push]].astype(np.uint64)
        n = len(slots)
        rings.append(TraceRing(key, slots, offsets,
                               _marks(slots, offsets, reset_at),
                               len(np.unique(reset_at[(reset_at > 0) & (reset_at < n)]))))
    return TracePlan(tuple(rings), ring_entries, name)


def plan_from_source(src: EventSource, name: str) -> TracePlan:
    """:func:`plan_from_events` over an opened trace; the ring size is the largest the
    source names for any VM (None when it names none)."""
    sizes = [v for v in src.meta.ring_entries.values() if v]
    return plan_from_events(src.batches(), name, max(sizes) if sizes else None)


class TraceLayout:
    """Guest physical memory of a replay (see the module docstring); the interface the
    workload runner uses, like :class:`~.guest.GuestLayout`."""

    pattern = "trace"
    seed = 0

    def __init__(self, plan: TracePlan) -> None:
        self.plan = plan
        self.vcpus = len(plan.rings)
        self.pages = max(len(r) for r in plan.rings)  # the longest ring's writes
        self.table_len = [len(r) for r in plan.rings]
        sizes: dict[int, int] = {}
        for ring in plan.rings:
            if len(ring):
                for slot in np.unique(ring.slots).tolist():
                    top = int(ring.offsets[ring.slots == slot].max()) + 1
                    sizes[slot] = max(sizes.get(slot, 0), top)
        self.code_slot = next(s for s in range(len(sizes) + 1) if s not in sizes)
        self.table_first = [1] * self.vcpus
        page = 1
        for i, n in enumerate(self.table_len):
            self.table_first[i] = page
            page += -(-n * 4 // PAGE_SIZE)
        self.code_pages = page
        self.slots: dict[int, tuple[int, int]] = {}  # slot id -> (first GPA page, pages)
        for slot in sorted(sizes):
            self.slots[slot] = (page, sizes[slot])
            page += sizes[slot]
            if page * PAGE_SIZE > MAX_TRACE_SPAN:
                raise UsageError(
                    f"{plan.name}: slot {slot} offset {sizes[slot] - 1:#x} needs "
                    f"{page * PAGE_SIZE >> 20} MiB of guest memory, beyond the "
                    f"{MAX_TRACE_SPAN >> 20} MiB a replay guest spans",
                    "replay a trace of a smaller guest")

    def regions(self) -> list[MemoryRegion]:
        """The code slot first (GPA 0, not dirty-logged), then the trace's slots."""
        out = [MemoryRegion(self.code_slot, 0, self.code_pages * PAGE_SIZE, log_dirty=False)]
        out += [MemoryRegion(slot, first * PAGE_SIZE, pages * PAGE_SIZE)
                for slot, (first, pages) in self.slots.items()]
        return out

    @property
    def memory_bytes(self) -> int:
        return self.code_pages * PAGE_SIZE

    def table(self, vcpu: int) -> array:
        """vCPU ``vcpu``'s table: u32 GPA of each write's page, bit 0 set on a mark and on
        the first write (a pass starts with a harvest)."""
        ring = self.plan.rings[vcpu]
        base = np.zeros(len(ring), dtype=np.uint64)
        for slot, (first, _pages) in self.slots.items():
            base[ring.slots == slot] = first
        gpa = (base + ring.offsets) * np.uint64(PAGE_SIZE) | ring.marks.astype(np.uint64)
        gpa[:1] |= np.uint64(_MARK)
        return array("I", gpa.astype(np.uint32).tobytes())

    def table_gpa(self, vcpu: int) -> int:
        return self.table_first[vcpu] * PAGE_SIZE

    def load(self, memory: memoryview | bytearray, code: GuestCode) -> None:
        """Write the code and every table into the code slot's host mapping."""
        load_tables(memory, code, self)

    def initial_regs(self, vcpu: int, passes: int, exit_every: int,
                     code: GuestCode | None = None) -> dict[str, int]:
        """Registers at entry; a vCPU whose ring pushed nothing starts on the ``hlt``."""
        start = self.table_gpa(vcpu)
        rip = code.labels["done"] if code is not None and not self.table_len[vcpu] else 0
        return {"rbp": start, "rdi": start + 4 * self.table_len[vcpu],
                "rbx": passes & 0xFFFFFFFF, "rcx": exit_every, "rdx": 0, "rsi": start,
                "rip": rip, "rflags": 0x2}

    def written_entries(self, vcpu: int, writes: int) -> set[tuple[int, int]]:
        """Distinct (slot, offset) vCPU ``vcpu`` dirtied in its first ``writes`` writes."""
        ring = self.plan.rings[vcpu]
        n = min(writes, len(ring))
        return set(zip(ring.slots[:n].tolist(), ring.offsets[:n].tolist(), strict=False))
