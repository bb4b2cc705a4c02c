"""The reference replay: one event at a time through :class:`~.ring.DirtyRing` models.

Slow and plain on purpose: it defines what the fast, vectorised replay
(:mod:`kvmtrace.analysis.replay`) must compute, and the tests compare the two field by
field. Per ring (one ``struct kvm_dirty_ring``, keyed by pid, VM fd and ring index):

- the first push or reset event starts the model at that event's indices; entries pushed
  before it are live with unknown content;
- a push moves dirty_index by one. A jump forward is a *gap* (push events the trace lost;
  the missing entries are pushed with unknown content), a jump back is *backwards* (the
  model resyncs to the event);
- ``reset_index`` on any event is the kernel's: an advance collects entries
  reset_index..new (the model marks them RESET and runs the kernel's reset walk), and
  those are the *harvested* entries. An advance past dirty_index is *reset_beyond*; a
  retreat is *backwards*. An advance shown by a push but by no later reset event is a
  *gap* (reset events lost), reported at the end;
- a push onto a live entry overwrites it: *overflow*, one anomaly per episode (until a
  reset brings used back to at most size), listing the overwritten (slot, offset);
- a push made while ``used >= soft_limit`` counts as past the soft limit; if the episode
  (used >= soft_limit until a reset brings it below) ends with no soft-full exit: *no_exit*;
- a soft-full exit while reset_index has not moved since the ring's previous exit is a
  *livelock*, one anomaly per episode (until reset progress), counting the exits;
- events reach the ring model in causal order, not trace order: a reset with
  dirty_index D after push D and before push D + 1, ties (exits, stalls at index D) by
  time then trace order; defined here one event at a time (:meth:`_Track.arrive`), with
  the look-ahead bounds of :mod:`kvmtrace.analysis.replay.order` (HOLD_VCPU, HOLD_RESETS);
  a ring-size event and a VM's first soft-full exit of unknown size first drain the VM's
  waiting events;
- entries carry the number of the push that wrote them; an entry lost to an overwrite,
  or stranded (pushed while the ring is stuck at the end: reset_index on an entry a reset
  cleared, used > 0), makes its page lost unless a later push of it was collected;
- no_exit only when the episode's used passed the ring size (pushes into a full ring);
  earlier pushes past the soft limit are allowed until the vCPU's next guest entry, which
  no event shows;
- a reset_index advance shown by pushes and by no later reset event is a gap only on
  kernels before 6.16 (later ones stop a reset part-way with -EINTR and no event);
- the ring size comes from KT_RING_SIZE events, else the source's meta, else it is
  inferred for the whole VM at its first soft-full exit (the policy of
  :mod:`kvmtrace.model.sizes`, shared with the fast replay);
  until then rings are modelled with KVM_DIRTY_RING_MAX_ENTRIES entries (exact for
  harvests) and overflow/soft-limit checks wait for the size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..core.events import Kind
from ..core.kvm_abi import (
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_RING_MAX_ENTRIES,
    KVM_DIRTY_RING_RSVD_ENTRIES,
    UNKNOWN_SLOT,
    s32,
    u32,
)
from ..core.sources import SourceMeta
from ..model.digest import MultisetDigest
from ..model.results import (
    LIST_CAP,
    Anomaly,
    AnomalyKind,
    PendingReset,
    RingId,
    RingResult,
    SoftEpisode,
)
from ..model.ring import DirtyRing, resets_interruptible
from ..model.sizes import RingSizes

__all__ = ["ReferenceReplay", "ReferenceResult"]

A = AnomalyKind
HOLD_VCPU = 64  #: as kvmtrace.analysis.replay.order
HOLD_RESETS = 1024
_Ev = tuple[int, int, int, int, int, int, int]  # kind, ts, di, ri, slot, value, seq


@dataclass
class ReferenceResult:
    rings: dict[RingId, RingResult]
    anomalies: list[Anomaly]
    harvested: dict[RingId, list[tuple[int, int]]] = field(default_factory=dict)


class _Track:
    def __init__(self, key: RingId, size: int | None, source: str, reserved: int,
                 eintr: bool = True) -> None:
        self.key = key
        self.eintr = eintr
        self.vq: deque[tuple[_Ev, int | None]] = deque()  # vCPU events and their index
        self.rq: deque[_Ev] = deque()
        self.last_push: int | None = None
        self.seqs: list[int] = []  # push number of each entry's content
        self.nseq = 0
        self.lost: dict[tuple[int, int], list[int]] = {}  # entries lost, seq lost, seq got
        self.reserved = reserved
        self.res = RingResult(ring=key, size=size, size_source=source)
        self.ring: DirtyRing | None = None
        self.digest = MultisetDigest()
        self.harvest: list[tuple[int, int]] = []
        self.anomalies: list[Anomaly] = []
        self.overflow: Anomaly | None = None
        self.soft: SoftEpisode | None = None
        self.last_exit_reset: int | None = None
        self.livelock: Anomaly | None = None
        self.exit_ts: int | None = None
        self.unconfirmed: PendingReset | None = None

    @property
    def cap(self) -> int:
        return self.res.size or KVM_DIRTY_RING_MAX_ENTRIES

    def used(self) -> int:
        assert self.ring is not None
        return s32(self.ring.dirty_index - self.ring.reset_index)

    def _new_ring(self, size: int) -> DirtyRing:
        self.seqs = [-1] * size
        return DirtyRing(size, self.key[2], self.reserved, fill_slot=UNKNOWN_SLOT)

    # -- causal order ---------------------------------------------------------------
    def arrive(self, ev: _Ev, process: object) -> None:
        """An event in trace order; ``process(ev)`` gets them in causal order."""
        if ev[0] == Kind.RESET:
            self.rq.append(ev)
        else:
            if ev[0] == Kind.PUSH:
                self.last_push = ev[2]
            self.vq.append((ev, self.last_push))
        self.pump(process, False)

    def _reset_first(self, r: _Ev, v: tuple[_Ev, int | None]) -> bool:
        ev, k = v
        later = (r[1], r[6]) < (ev[1], ev[6])
        if k is None:
            return later
        d = s32(k - r[2])
        return d > 0 or (d == 0 and ev[0] != Kind.PUSH and later)

    def pump(self, process: object, final: bool) -> None:
        vq, rq = self.vq, self.rq
        while vq or rq:
            if vq and rq:
                ev = rq.popleft() if self._reset_first(rq[0], vq[0]) else vq.popleft()[0]
            elif rq:
                beyond = self.last_push is None or s32(rq[0][2] - self.last_push) > 0
                if not (final or not beyond or len(rq) > HOLD_RESETS):
                    return
                ev = rq.popleft()
            else:
                if not (final or len(vq) > HOLD_VCPU):
                    return
                ev = vq.popleft()[0]
            process(ev)  # type: ignore[operator]

    # -- lost pages -----------------------------------------------------------------
    def _lost(self, slot: int, offset: int, seq: int) -> None:
        if slot == UNKNOWN_SLOT:
            return
        p = self.lost.setdefault((slot, offset), [0, -1, -1])
        p[0] += 1
        p[1] = max(p[1], seq)

    def _got(self, slot: int, offset: int, seq: int) -> None:
        p = self.lost.get((slot, offset))
        if p is not None:
            p[2] = max(p[2], seq)

    def start(self, dirty: int, reset: int) -> None:
        r = self.ring = self._new_ring(self.cap)
        r.dirty_index, r.reset_index = dirty, reset
        for k in range(min(max(s32(dirty - reset), 0), self.cap)):
            r.entry_at(dirty - 1 - k).flags = KVM_DIRTY_GFN_F_DIRTY
        self._soft_check()

    def anomaly(self, kind: AnomalyKind, ts: int, di: int, ri: int, count: int,
                **extra: object) -> Anomaly:
        a = Anomaly(kind, self.key, ts, di, ri, count, extra=dict(extra))
        self.anomalies.append(a)
        return a

    # -- pushes ---------------------------------------------------------------------
    def _push(self, ts: int, slot: int, offset: int) -> None:
        r = self.ring
        assert r is not None
        before = self.used()
        pos = r.dirty_index & (r.size - 1)
        old_seq = self.seqs[pos]
        self.seqs[pos] = self.nseq
        self.nseq += 1
        lost = r.push(slot, offset)
        after = self.used()
        size = self.res.size
        if lost is not None:
            self._lost(lost.slot, lost.offset, old_seq)
            self.res.overwritten += 1
            if self.overflow is None:
                self.overflow = self.anomaly(A.OVERFLOW, ts, r.dirty_index, r.reset_index, 0,
                                             size=self.cap, max_used=after)
            ov = self.overflow
            ov.count += 1
            ov.extra["max_used"] = max(ov.extra["max_used"], after)
            if len(ov.entries) < LIST_CAP:
                ov.entries.append((lost.slot, lost.offset))
        if size is not None:
            self._soft_check()
            ep = self.soft
            if ep is not None:
                ep.max_used = max(ep.max_used, after)
                if before >= size - self.reserved and not ep.exited:
                    ep.past += 1
                    if ep.first is None:
                        ep.first = (ts, r.dirty_index, r.reset_index)

    def _fill_gap(self, ts: int, n: int) -> None:
        assert self.ring is not None
        fill = min(n, self.cap)
        self.ring.dirty_index = u32(self.ring.dirty_index + n - fill)
        for _ in range(fill):
            self._push(ts, UNKNOWN_SLOT, 0)

    def _sync_dirty(self, ts: int, dirty: int, ri: int, event: str) -> None:
        """Bring the model's dirty_index to ``dirty`` (the value before a push, or the
        reset event's)."""
        r = self.ring
        assert r is not None
        d = s32(dirty - r.dirty_index)
        if d > 0:
            expected = u32(r.dirty_index + (1 if event == "push" else 0))
            got = u32(dirty + (1 if event == "push" else 0))
            self.anomaly(A.GAP, ts, got, ri, d, index="dirty_index", expected=expected,
                         got=got, event=event)
            self.res.lost_pushes += d
            self._fill_gap(ts, d)
        elif d < 0:
            after = u32(dirty + (1 if event == "push" else 0))
            self.anomaly(A.BACKWARDS, ts, after, ri, -d, index="dirty_index",
                         before=r.dirty_index, after=after, event=event)
            r.dirty_index = dirty

    def on_push(self, ts: int, di: int, ri: int, slot: int, offset: int) -> None:
        self._seen(ts)
        if self.ring is None:
            self.start(u32(di - 1), ri)
        self._sync_dirty(ts, u32(di - 1), ri, "push")
        # the push's reset_index is read after its entry was written: a reset walk that
        # shows past that entry collected it, so it ran after the write
        late = s32(ri - (di - 1)) > 0
        if late and s32(u32(di - 1) - self.ring.reset_index) > 0:  # type: ignore[union-attr]
            self._sync_reset(ts, u32(di - 1), "push")
        if not late:
            self._sync_reset(ts, ri, "push")
        self._push(ts, slot, offset)
        if late:
            self._sync_reset(ts, ri, "push")
        self.res.pushes += 1
        self._indices(di, ri)
        if self.exit_ts is not None:
            self.res.exit_to_push.add(ts - self.exit_ts)
            self.exit_ts = None

    # -- resets ---------------------------------------------------------------------
    def on_reset(self, ts: int, di: int, ri: int) -> None:
        self._seen(ts)
        self.res.resets += 1
        if self.ring is None:
            self.start(di, ri)
        else:
            self._sync_dirty(ts, di, ri, "reset")
            if self.unconfirmed is not None and s32(ri - self.unconfirmed.to) >= 0:
                self.unconfirmed = None
            self._sync_reset(ts, ri, "reset")
        self._indices(di, ri)

    def _sync_reset(self, ts: int, ri: int, event: str) -> None:
        r = self.ring
        assert r is not None
        d = s32(ri - r.reset_index)
        if d < 0:
            self.anomaly(A.BACKWARDS, ts, r.dirty_index, ri, -d, index="reset_index",
                         before=r.reset_index, after=ri, event=event)
            r.reset_index = ri
        elif d > 0:
            beyond = s32(ri - r.dirty_index)
            if beyond > 0:
                self.anomaly(A.RESET_BEYOND, ts, r.dirty_index, ri, beyond)
            if event == "push" and self.unconfirmed is None:
                self.unconfirmed = PendingReset(ts, r.dirty_index, r.reset_index, ri)
            elif event == "push":
                self.unconfirmed.to = ri
            skip = d - min(d, self.cap)
            self.res.harvested_unknown += skip
            r.reset_index = u32(r.reset_index + skip)
            r.mark_reset(r.reset_index, d - skip)
            at = r.reset_index
            for k, (slot, offset) in enumerate(r.reset()):
                self._got(slot, offset, self.seqs[(at + k) & (r.size - 1)])
                if slot == UNKNOWN_SLOT:
                    self.res.harvested_unknown += 1
                else:
                    self.res.harvested += 1
                    self.digest.add(slot, offset)
                    self.harvest.append((slot, offset))
            assert r.reset_index == ri
            self.res.entries_reset += d
            self.livelock = None
        else:
            return
        if self.overflow is not None and self.used() <= self.cap:
            self.overflow = None
        self._soft_check()

    # -- soft limit, exits, stalls ------------------------------------------------------
    def _soft_check(self) -> None:
        size = self.res.size
        if size is None or self.ring is None:
            return
        used = self.used()
        if used >= size - self.reserved and self.soft is None:
            self.soft = SoftEpisode(max_used=used)
        elif used < size - self.reserved and self.soft is not None:
            self.close_soft()

    def close_soft(self) -> None:
        ep, self.soft = self.soft, None
        if (ep is not None and not ep.exited and ep.past
                and ep.max_used > self.res.size):
            assert ep.first is not None
            ts, di, ri = ep.first
            self.anomaly(A.NO_EXIT, ts, di, ri, ep.past,
                         soft_limit=self.res.size - self.reserved, max_used=ep.max_used)

    def on_exit(self, ts: int) -> None:
        self._seen(ts)
        self.res.soft_full_exits += 1
        if self.soft is not None:
            self.soft.exited = True
        if self.ring is not None:
            cur = self.ring.reset_index
            if self.last_exit_reset is not None and cur == self.last_exit_reset:
                if self.livelock is None:
                    self.livelock = self.anomaly(A.LIVELOCK, ts, self.ring.dirty_index, cur,
                                                 1, used=self.used())
                self.livelock.count += 1
            self.last_exit_reset = cur
        self.exit_ts = ts

    def set_size(self, size: int, source: str, ts: int) -> None:
        old = self.ring
        self.res.size, self.res.size_source = size, source
        if old is None:
            return
        old_seqs = self.seqs
        new = self._new_ring(size)
        new.dirty_index, new.reset_index = old.dirty_index, old.reset_index
        for k in range(min(size, old.size)):
            i = u32(old.dirty_index - 1 - k)
            e, n = old.entry_at(i), new.entry_at(i)
            n.flags, n.slot, n.offset = e.flags, e.slot, e.offset
            self.seqs[i & (size - 1)] = old_seqs[i & (old.size - 1)]
        self.ring = new
        lost_n = s32(old.dirty_index - size - old.reset_index)
        for k in range(min(max(lost_n, 0), old.size)):
            e = old.entry_at(old.reset_index + k)
            if not e.flags:
                continue
            self._lost(e.slot, e.offset, old_seqs[u32(old.reset_index + k) & (old.size - 1)])
            self.res.overwritten += 1
            if self.overflow is None:
                self.overflow = self.anomaly(A.OVERFLOW, ts, old.dirty_index, old.reset_index,
                                             0, size=size, max_used=self.used())
            self.overflow.count += 1
            if len(self.overflow.entries) < LIST_CAP:
                self.overflow.entries.append((e.slot, e.offset))
        self._soft_check()

    def _seen(self, ts: int) -> None:
        if self.res.first_ns is None:
            self.res.first_ns = ts
        self.res.last_ns = ts

    def _indices(self, di: int, ri: int) -> None:
        self.res.dirty_index, self.res.reset_index = di, ri
        self.res.max_used = max(self.res.max_used, s32(di - ri))

    def finish(self) -> None:
        self.close_soft()
        r = self.ring
        if r is not None and self.used() > 0 and not r.entry_at(r.reset_index).flags:
            n = 0
            for i, e in enumerate(r.entries):
                if e.flags:
                    n += 1
                    self._lost(e.slot, e.offset, self.seqs[i])
            self.res.stranded, self.res.stuck = n, True
            self.anomaly(A.STUCK, self.res.last_ns or 0, r.dirty_index, r.reset_index, n,
                         used=self.used())
        pages = sorted((s, o, p[0]) for (s, o), p in self.lost.items() if p[1] > p[2])
        self.res.lost_pages, self.res.lost_page_count = pages[:LIST_CAP], len(pages)
        p = self.unconfirmed
        if p is not None and not self.eintr:
            self.anomaly(A.GAP, p.ts, p.dirty_index, p.to, 1, index="reset_index",
                         expected=p.start, got=p.to, event="push")


class ReferenceReplay:
    """Feed EVENT_DTYPE batches in time order, then :meth:`finish`."""

    def __init__(self, meta: SourceMeta | None = None, *,
                 reserved: int = KVM_DIRTY_RING_RSVD_ENTRIES) -> None:
        self.meta = meta or SourceMeta(kind="unknown")
        self.reserved = reserved
        self.tracks: dict[RingId, _Track] = {}
        self.sizes = RingSizes(self.meta, reserved)
        self.seq = 0
        self.eintr = resets_interruptible(self.meta.kernel_release)

    def track(self, key: RingId) -> _Track:
        t = self.tracks.get(key)
        if t is None:
            size, source = self.sizes.size(key[0], key[1])
            t = self.tracks[key] = _Track(key, size, source, self.reserved, self.eintr)
        return t

    def _resize_vm(self, pid: int, vm: int, ts: int) -> None:
        size, source = self.sizes.size(pid, vm)
        assert size is not None
        for key, t in self.tracks.items():
            if key[:2] == (pid, vm) and t.res.size != size:
                t.set_size(size, source, ts)

    def _process(self, t: _Track, ev: _Ev) -> None:
        kind, ts, di, ri, slot, value, _ = ev
        if kind == Kind.PUSH:
            t.on_push(ts, di, ri, slot, value)
        elif kind == Kind.RESET:
            t.on_reset(ts, di, ri)
        elif kind == Kind.EXIT:
            t.on_exit(ts)
        else:
            t.res.stalls.add(value)

    def _drain(self, pid: int, vm: int) -> None:
        for key, t in self.tracks.items():
            if key[:2] == (pid, vm):
                t.pump(lambda ev, t=t: self._process(t, ev), True)

    def feed(self, events: Iterable[np.void] | np.ndarray) -> None:
        for e in events:
            self.seq += 1
            kind, ts = int(e["kind"]), int(e["ts"])
            pid, vm, ring = int(e["pid"]), int(e["vm"]), int(e["ring"])
            di, ri = int(e["dirty_index"]), int(e["reset_index"])
            if kind == Kind.RING_SIZE:
                self._drain(pid, vm)
                if self.sizes.from_event(pid, vm, int(e["value"])) is not None:
                    self._resize_vm(pid, vm, ts)
                continue
            if kind not in (Kind.PUSH, Kind.RESET, Kind.EXIT, Kind.STALL):
                continue
            t = self.track((pid, vm, ring))
            ev = (kind, ts, di, ri, int(e["slot"]), int(e["value"]), self.seq)
            unknown = kind == Kind.EXIT and not self.sizes.known(pid, vm)
            if unknown:  # infer the VM's ring size at its first soft-full exit
                self._drain(pid, vm)
                if t.ring is not None:
                    mx = max(x.res.max_used for k, x in self.tracks.items() if k[:2] == (pid, vm))
                    if self.sizes.infer(pid, vm, t.used(), mx) is not None:
                        self._resize_vm(pid, vm, ts)
            t.arrive(ev, lambda ev, t=t: self._process(t, ev))
            if unknown:
                t.pump(lambda ev, t=t: self._process(t, ev), True)

    def finish(self) -> ReferenceResult:
        anomalies: list[Anomaly] = []
        for t in self.tracks.values():
            t.pump(lambda ev, t=t: self._process(t, ev), True)
            t.finish()
            t.res.harvest_sum1, t.res.harvest_sum2 = t.digest.sum1, t.digest.sum2
            anomalies.extend(t.anomalies)
        anomalies.sort(key=lambda a: (a.time_ns, a.ring, a.kind.value))
        return ReferenceResult(
            rings={k: t.res for k, t in sorted(self.tracks.items())},
            anomalies=anomalies,
            harvested={k: sorted(t.harvest) for k, t in sorted(self.tracks.items())},
        )
