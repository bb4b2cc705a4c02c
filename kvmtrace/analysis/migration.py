"""Live-migration iterations (dirty-log syncs) of a VMM, found in a recording.

What marks an iteration (QEMU 7.2, accel/kvm/kvm-all.c and migration/ram.c):

- Each ``migration_bitmap_sync`` (one per iteration; QEMU's ``dirty-sync-count`` counts
  them) reaches ``kvm_dirty_ring_flush``: it kicks every vCPU out of the guest, then reaps
  every vCPU's ring and, when it collected anything, issues one ``KVM_RESET_DIRTY_RINGS``
  (``kvm_dirty_ring_reap_locked``). The sync runs in the *migration thread*, created by
  ``migrate``. In a recording that is one ``kvm_dirty_ring_reset`` per ring, back to back
  (the kernel visits vCPUs in order), from a thread that never pushes (not a vCPU).
- Two other kinds of thread reset the rings: a vCPU thread after a soft-full exit
  (``KVM_EXIT_DIRTY_RING_FULL``; it pushes, so it is known as a vCPU), and the *reaper*
  (``kvm_dirty_ring_reaper_thread``: sleep 1 s, reap, reset). QEMU starts the reaper in
  ``kvm_init``, before it creates any vCPU thread, and the migration thread after them, so
  (pids being handed out in increasing order) the reaper's tid is below every vCPU's tid
  and the migration thread's above. The rule: **an iteration boundary is a reset of the
  rings by a thread of the VMM that never pushed, exited or stalled and whose tid is above
  the lowest vCPU tid** (a *sync thread*). Its resets are QEMU's syncs that collected
  something; checked against QEMU's own trace (``migration_bitmap_sync_start`` and
  ``kvm_dirty_ring_reap reaped N pages`` with thread ids: tests/test_qemu_migrate_kvm.py).
- Limits: a sync that collected nothing does not reset and does not show. Measured with
  a guest that dirties pages all the time: QEMU's first sync (right after logging starts)
  and its stop-and-copy sync (after the VM stopped; nothing when the vCPUs dirtied nothing
  after the last live sync) sometimes collect nothing, every sync between them collects.
  ``calc-dirty-rate`` and the dirty limit's rate thread sync the same way from threads of
  their own and show as sync threads too; a pid wrap between QEMU's start and ``migrate``
  breaks the tid order.

Per iteration n (window: the ring's reset by sync n-1, exclusive, to its reset by sync n;
the first from the first event of the ring): entries the sync itself *collected* (its
resets' ``reset_index`` advance: QEMU's ``kvm_dirty_ring_reap reaped N pages``), entries
*harvested* (the ring's ``reset_index`` advance over the window: collected by any
thread), distinct *pages* among
the pushes those entries hold (``dirty_index`` in the window's index range), soft-full
exits and stall ns (STALL events ending in the window, by time). Pages dirtied in window
n-1 are what QEMU had to send in window n (its bitmap after sync n-1; after sync 1 it sends
all of RAM, which no dirty ring shows), so ``sent_pages`` is known from iteration 3 on and
the transfer rate is estimated as ``sent_pages`` over the window: the migration converges
while fewer pages are dirtied than sent. After the last sync of a completed migration the
VM is stopped: no push follows it (``stopped``).

Page sizes are 4 KiB; MB/s are MiB/s of 4 KiB pages (QEMU's units). Indices are taken as
free-running without a u32 wrap (2**32 pushes per ring).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..core.columns import GROUP_FIELDS, EventColumns
from ..core.events import EVENT_DTYPE, Kind, vm_keys, vm_pairs
from ..core.sources import EventSource
from .throttle import StallSplit, stall_splits

__all__ = ["RESET_GAP_NS", "RingWindow", "Iteration", "Migration", "reset_calls",
           "find_migrations", "migrations_of", "replay_extras", "ExtrasTap", "PAGE_BYTES"]

PAGE_BYTES = 4096
#: two resets of one thread further apart than this are two KVM_RESET_DIRTY_RINGS
RESET_GAP_NS = 1_000_000


def _mbps(pages: int, ns: int) -> float | None:
    return pages * PAGE_BYTES / (1 << 20) / (ns / 1e9) if ns > 0 else None


@dataclass(frozen=True)
class RingWindow:
    """One vCPU ring (``struct kvm_dirty_ring``) over one iteration's window."""

    ring: int
    harvested: int  #: entries collected by resets in the window (reset_index advance)
    pages: int  #: distinct pages among those entries
    pushes: int  #: pushes in the window (by time)
    soft_full_exits: int
    stall_ns: int  #: soft-full stalls (exit 31 to next KVM_RUN) ending in the window


@dataclass(frozen=True)
class Iteration:
    """The ``number``-th sync seen (QEMU's ``dirty-sync-count`` after it, less the syncs
    that collected nothing) and the window before it."""

    number: int
    ts: int  #: ns, CLOCK_MONOTONIC: the sync's last ring reset
    start_ns: int  #: the previous sync (or the first event of the VM's rings)
    rings: list[RingWindow]
    pages: int  #: distinct pages dirtied in the window, all rings
    other_resets: dict[str, int]  #: resets by "vcpu" and "reaper" threads in the window
    sent_pages: int | None = None  #: pages QEMU sent in the window (None: not known)
    collected: int = 0  #: entries the sync's own reset collected (reset_index advance)

    @property
    def duration_ns(self) -> int:
        return self.ts - self.start_ns

    @property
    def harvested(self) -> int:
        return sum(r.harvested for r in self.rings)

    @property
    def dirty_rate_mbps(self) -> float | None:
        """Distinct pages dirtied in the window, MiB/s."""
        return _mbps(self.pages, self.duration_ns)

    @property
    def transfer_rate_mbps(self) -> float | None:
        """Pages sent in the window (estimated: the previous window's), MiB/s."""
        return None if self.sent_pages is None else _mbps(self.sent_pages, self.duration_ns)

    @property
    def converging(self) -> bool | None:
        """Fewer pages dirtied than sent (None: sent not known)."""
        return None if self.sent_pages is None else self.pages < self.sent_pages


@dataclass
class Migration:
    """The syncs of one sync thread ``tid`` of VM ``vm`` of process ``pid``."""

    pid: int
    vm: int
    tid: int
    vcpu_tids: list[int]
    reaper_tids: list[int]  #: non-vCPU resetting threads below the vCPUs (the reaper)
    iterations: list[Iteration] = field(default_factory=list)
    #: no push after the last sync: the VM stopped (stop-and-copy) or logging ended
    stopped: bool = False

    @property
    def verdict(self) -> str:
        known = [it for it in self.iterations if it.converging is not None]
        if self.stopped:
            return ("no push after the last sync: the VM stopped (a migration's "
                    "stop-and-copy) or dirty logging ended")
        if not known:
            return "too few iterations to tell"
        if known[-1].converging:
            return "converging: fewer pages dirtied than sent in the last iteration"
        return "not converging: as many pages dirtied as sent in the last iteration"


def reset_calls(resets: np.ndarray, lats: np.ndarray | None = None) -> list[np.ndarray]:
    """RESET events (one thread's, time order) split into KVM_RESET_DIRTY_RINGS calls.
    With that thread's RESET_LAT events (``lats``: one per call, ts = its end, value = its
    ns) a call is the resets inside one; without them (text traces), resets that visit
    rings in increasing index less than :data:`RESET_GAP_NS` apart."""
    if not len(resets):
        return []
    ts = resets["ts"].astype(np.int64)
    if lats is not None and len(lats):
        ends = np.sort(lats["ts"].astype(np.int64))
        call = np.searchsorted(ends, ts, side="left")  # the first call ending at/after
        cut = np.flatnonzero(np.diff(call)) + 1
        return np.split(resets, cut)
    ring = resets["ring"]
    new = np.ones(len(resets), bool)
    new[1:] = (np.diff(ts) > RESET_GAP_NS) | (ring[1:] <= ring[:-1])
    cut = np.flatnonzero(new)
    return np.split(resets, cut[1:])


def _index_at(ts: np.ndarray, ri: np.ndarray, first: int, t: int) -> int:
    """reset_index of a ring at time t: of its last event at or before t."""
    k = int(np.searchsorted(ts, t, side="right"))
    return first if k == 0 else int(ri[k - 1])


def find_migrations(ev: np.ndarray) -> list[Migration]:
    """Every sync thread's iterations in ``ev`` (EVENT_DTYPE, any order)."""
    ev = ev[np.argsort(ev["ts"], kind="stable")]
    out = []
    for pid, vm in vm_pairs(ev):
        mine = ev[(ev["pid"] == pid) & (ev["vm"] == vm)]
        out += _vm_migrations(pid, vm, mine)
    return out


def _vm_migrations(pid: int, vm: int, ev: np.ndarray) -> list[Migration]:
    kind = ev["kind"]
    vcpu = np.isin(kind, [Kind.PUSH, Kind.EXIT, Kind.STALL])
    vcpu_tids = sorted(set(ev["tid"][vcpu].tolist()))
    resets = ev[kind == Kind.RESET]
    if not vcpu_tids or not len(resets):
        return []
    lowest = vcpu_tids[0]
    others = sorted(set(resets["tid"].tolist()) - set(vcpu_tids))
    reapers = [t for t in others if t < lowest]
    out = []
    lats = ev[kind == Kind.RESET_LAT]
    for tid in (t for t in others if t > lowest):
        calls = reset_calls(resets[resets["tid"] == tid], lats[lats["tid"] == tid])
        mig = Migration(pid, vm, tid, vcpu_tids, reapers)
        mig.iterations = _iterations(ev, calls, set(vcpu_tids), set(reapers))
        pushes = ev["ts"][kind == Kind.PUSH]
        mig.stopped = bool(len(calls)) and int(pushes.max(initial=0)) < int(calls[-1]["ts"][0])
        out.append(mig)
    return out


def _iterations(ev: np.ndarray, calls: list[np.ndarray], vcpus: set[int],
                reapers: set[int]) -> list[Iteration]:
    kind = ev["kind"]
    rings = sorted(set(ev["ring"][(kind == Kind.PUSH) | (kind == Kind.RESET)].tolist()))
    per_ring = {}
    for r in rings:
        mine = ev[(ev["ring"] == r) & ((kind == Kind.PUSH) | (kind == Kind.RESET))]
        push = mine[mine["kind"] == Kind.PUSH]
        order = np.argsort(push["dirty_index"], kind="stable")
        per_ring[r] = (mine["ts"].astype(np.int64), mine["reset_index"].astype(np.int64),
                       int(mine["reset_index"][0]) if len(mine) else 0,
                       push["dirty_index"].astype(np.int64)[order],
                       (push["slot"].astype(np.uint64) << np.uint64(32)
                        | push["value"].astype(np.uint64))[order],
                       push["ts"].astype(np.int64))
    exits = ev[kind == Kind.EXIT]
    stalls = ev[kind == Kind.STALL]
    lats = ev[kind == Kind.RESET_LAT]
    all_resets = ev[kind == Kind.RESET]
    start_all = int(ev["ts"][0])
    prev_bound: dict[int, int] = {}
    prev_ts = start_all
    out: list[Iteration] = []
    for n, call in enumerate(calls, 1):
        bound = {int(e["ring"]): int(e["ts"]) for e in call}
        t_end = int(call["ts"][-1])
        collected = 0
        for e in call:  # resets are serialised (kvm->slots_lock): the ring's previous one
            mine = all_resets[(all_resets["ring"] == e["ring"]) & (all_resets["ts"] < e["ts"])]
            ring = int(e["ring"])
            before = (int(mine["reset_index"][-1]) if len(mine)
                      else per_ring[ring][2] if ring in per_ring else 0)
            collected += int(e["reset_index"]) - before
        windows, pages = [], []
        for r in rings:
            ts, ri, first, di, page, pts = per_ring[r]
            lo_t, hi_t = prev_bound.get(r, -1), bound.get(r, t_end)
            lo = first if lo_t < 0 else _index_at(ts, ri, first, lo_t)
            hi = _index_at(ts, ri, first, hi_t)
            a, b = np.searchsorted(di, [lo + 1, hi + 1])  # dirty_index in (lo, hi]
            got = np.unique(page[a:b])
            pages.append(got)
            in_t = (pts > lo_t) & (pts <= hi_t)
            rex = exits[(exits["ring"] == r) & (exits["ts"] > lo_t) & (exits["ts"] <= hi_t)]
            rst = stalls[(stalls["ring"] == r) & (stalls["ts"] > lo_t) & (stalls["ts"] <= hi_t)]
            windows.append(RingWindow(r, hi - lo, len(got), int(in_t.sum()), len(rex),
                                      int(rst["value"].sum())))
        win = all_resets[(all_resets["ts"] > prev_ts) & (all_resets["ts"] < int(call["ts"][0]))]
        other = {"vcpu": _calls(win, lats, vcpus), "reaper": _calls(win, lats, reapers)}
        distinct = len(np.unique(np.concatenate(pages))) if pages else 0
        sent = out[-1].pages if n >= 3 else None
        out.append(Iteration(n, t_end, prev_ts, windows, distinct, other, sent, collected))
        prev_bound.update(bound)
        prev_ts = t_end
    return out


def _calls(resets: np.ndarray, lats: np.ndarray, tids: set[int]) -> int:
    return sum(len(reset_calls(resets[resets["tid"] == t], lats[lats["tid"] == t]))
               for t in tids)


def migrations_of(open_src: Callable[[], EventSource]) -> list[Migration]:
    """:func:`find_migrations` over a source (see :func:`replay_extras`)."""
    return replay_extras(open_src)[0]


def _pushers_and_rest(cols: EventColumns) -> tuple[set[tuple[int, int, int]], np.ndarray]:
    """One block as columns: the (pid, vm, tid) of its pushing threads (from the group
    table) and its events other than pushes as records, without building the pushes'."""
    g = cols.groups
    push_g = g["kind"] == Kind.PUSH
    pushers = set(zip(g["pid"][push_g].tolist(), g["vm"][push_g].tolist(),
                      g["tid"][push_g].tolist(), strict=True))
    if push_g.all():
        return pushers, np.zeros(0, EVENT_DTYPE)
    if not push_g.any() or cols.gid is None or cols.order is None:
        ev = cols.events()
        return pushers, ev[ev["kind"] != Kind.PUSH]
    # group-major positions of the other groups' events (few), from the groups' sizes:
    # no pass over the block's pushes but counting them
    rest = np.flatnonzero(~push_g)
    starts = cols.group_starts()
    lo, hi = starts[rest], starts[rest + 1]
    sizes = hi - lo
    gm = np.repeat(hi - np.cumsum(sizes), sizes) + np.arange(int(sizes.sum()))
    gm_gid = np.repeat(rest, sizes)
    times = np.take(cols.order, gm)  # their time positions
    by_time = np.argsort(times, kind="stable")
    tmpl = np.zeros(len(g), EVENT_DTYPE)
    for key in GROUP_FIELDS:
        tmpl[key] = g[key]
    for name, v in cols.const.items():
        tmpl[name] = v
    ev = tmpl.take(gm_gid[by_time])
    ev["ts"] = cols.ts[times[by_time]]
    gm = gm[by_time]
    for name, v in cols.grouped.items():
        ev[name] = np.take(v, gm)
    return pushers, ev


class ExtrasTap:
    """A :class:`~kvmtrace.analysis.replay.engine.ReplayTap`: while the replay reads the
    file, keeps the pushing threads and every event but pushes (a recording's pushes are
    never built as records), for :func:`replay_extras`."""

    def __init__(self) -> None:
        self.push_tids: set[tuple[int, int, int]] = set()
        self.rest: list[np.ndarray] = []

    def columns(self, cols: EventColumns) -> None:
        pushers, ev = _pushers_and_rest(cols)
        self.push_tids |= pushers
        self.rest.append(ev)

    def batch(self, b: np.ndarray) -> None:
        push = b["kind"] == Kind.PUSH
        self.rest.append(b[~push])
        if push.any():  # the (pid, vm, tid) of pushing threads: few, among many pushes
            p = b[push]  # a tid names one thread, so one pid: unique on (tid, vm) alone
            key = (p["tid"].astype(np.uint64) << np.uint64(32)) | p["vm"].astype(np.uint32)
            heads = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])  # runs of one thread
            _, first = np.unique(key[heads], return_index=True)
            first = heads[first]
            self.push_tids.update(zip(p["pid"][first].tolist(), p["vm"][first].tolist(),
                                      p["tid"][first].tolist(), strict=True))

    def share(self) -> ExtrasTap:
        """An empty tap for some of the blocks (a replay on several cores)."""
        return ExtrasTap()

    def join(self, shares: list[tuple[list[int], ExtrasTap]]) -> None:  # type: ignore[override]
        """Take in shares filled from the columns of the numbered blocks (one entry of
        ``rest`` per block), as if this tap had seen them in block order."""
        at: dict[int, np.ndarray] = {}
        for blocks, t in shares:
            self.push_tids |= t.push_tids
            assert len(blocks) == len(t.rest)
            at.update(zip(blocks, t.rest, strict=True))
        self.rest.extend(at[i] for i in sorted(at))

    def read(self, src: EventSource) -> ExtrasTap:
        """Fill the tap from ``src`` alone (when no replay runs)."""
        columns = src.column_batches()
        if columns is not None:
            for cols in columns:
                self.columns(cols)
        else:
            for b in src.batches():
                self.batch(b)
        return self


def replay_extras(open_src: Callable[[], EventSource], tap: ExtrasTap | None = None
                  ) -> tuple[list[Migration], list[StallSplit]]:
    """:func:`find_migrations` and :func:`~.throttle.stall_splits` over a source, in
    bounded memory unless there is a migration: everything but pushes (and the set of
    pushing threads) comes from ``tap``, filled by the replay's own pass (else
    ``open_src()`` is read once for it), and ``open_src()`` is read again only when a
    sync thread was found, for the pushes of those VMs (held in memory: a migration's
    length of them)."""
    tap = tap or ExtrasTap().read(open_src())
    push_tids, rest = tap.push_tids, tap.rest
    if not rest:
        return [], []
    ev = np.concatenate(rest)
    splits = stall_splits(ev)
    keep = set()
    for pid, vm in vm_pairs(ev):
        mine = ev[(ev["pid"] == pid) & (ev["vm"] == vm)]
        vcpu = {t for p, v, t in push_tids if (p, v) == (pid, vm)}
        vcpu |= set(mine["tid"][np.isin(mine["kind"], [Kind.EXIT, Kind.STALL])].tolist())
        resetters = set(mine["tid"][mine["kind"] == Kind.RESET].tolist()) - vcpu
        if vcpu and any(t > min(vcpu) for t in resetters):
            keep.add((pid, vm))
    if not keep:
        return [], splits
    wanted = np.array([p << 32 | (v & 0xFFFFFFFF) for p, v in keep], dtype=np.uint64)
    pushes = []
    for b in open_src().batches():
        push = b[b["kind"] == Kind.PUSH]
        pushes.append(push[np.isin(vm_keys(push), wanted)])
    return find_migrations(np.concatenate([ev, *pushes])), splits
