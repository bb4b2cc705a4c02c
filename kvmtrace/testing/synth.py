"""Synthetic dirty-ring event streams, made by driving :class:`~.ring.DirtyRing` models.

:class:`SynthVm` is a scripted VM (one ring per vCPU) whose every kernel-side step emits the
event the real tracepoint would: ``push`` (after dirty_index++), ``exit`` (soft-full exit at
guest entry), ``reset`` (one event per ring per KVM_RESET_DIRTY_RINGS). Tests use it to
build streams with known anomalies. :func:`bulk_stream` builds large, clean streams with
numpy for throughput measurements; :func:`workload_stream` a VMM-like stream with jitter,
soft-full exits, stalls and periodic resets (the recording tests' ground truth and
tools/bench_format.py's streams).
"""

from __future__ import annotations

import os

import numpy as np

from ..core.events import EVENT_DTYPE, Kind, empty
from ..core.kvm_abi import KVM_DIRTY_RING_RSVD_ENTRIES, bytes_from_entries, soft_limit_of
from ..model.ring import DirtyRing

__all__ = ["SynthVm", "bulk_stream", "workload_stream", "write_bulk_recording",
           "write_workload_recording"]


class SynthVm:
    """A VM of ``vcpus`` rings of ``entries`` entries; time advances ``step_ns`` per event."""

    def __init__(self, entries: int = 256, vcpus: int = 1, *, pid: int = 1000, vm: int = 7,
                 reserved: int = KVM_DIRTY_RING_RSVD_ENTRIES, t0_ns: int = 1_000_000_000,
                 step_ns: int = 1000, tid0: int = 2000) -> None:
        self.rings = [DirtyRing(entries, i, reserved) for i in range(vcpus)]
        self.pid, self.vm, self.tid0 = pid, vm, tid0
        self.now = t0_ns
        self.step = step_ns
        self._rows: list[tuple[int, int, int, int, int, int, int]] = []

    def _emit(self, kind: int, ring: int, di: int = 0, ri: int = 0, slot: int = 0,
              value: int = 0) -> None:
        self.now += self.step
        self._rows.append((self.now, kind, ring, di, ri, slot, value))

    def ring_size_event(self) -> None:
        """KT_RING_SIZE: the ring bytes the VMM enabled (value = bytes)."""
        self._emit(Kind.RING_SIZE, -1, value=bytes_from_entries(self.rings[0].size), slot=223)

    def push(self, vcpu: int, slot: int, offset: int) -> None:
        r = self.rings[vcpu]
        r.push(slot, offset)
        self._emit(Kind.PUSH, vcpu, r.dirty_index, r.reset_index, slot, offset)

    def enter(self, vcpu: int) -> bool:
        """Guest entry: emits the soft-full exit and returns True when the ring is soft-full
        (``kvm_dirty_ring_check_request``)."""
        if self.rings[vcpu].soft_full():
            self.exit(vcpu)
            return True
        return False

    def exit(self, vcpu: int) -> None:
        self._emit(Kind.EXIT, vcpu, slot=vcpu)

    def stall(self, vcpu: int, ns: int) -> None:
        self._emit(Kind.STALL, vcpu, value=ns)

    def harvest(self, vcpu: int | None = None, limit: int | None = None) -> int:
        """The VMM marks DIRTY entries RESET (one ring or all); returns how many."""
        rings = self.rings if vcpu is None else [self.rings[vcpu]]
        return sum(len(r.harvest(limit)) for r in rings)

    def reset(self) -> list[list[tuple[int, int]]]:
        """KVM_RESET_DIRTY_RINGS: every ring's reset walk, one reset event per ring."""
        out = []
        for r in self.rings:
            out.append(r.reset())
            self._emit(Kind.RESET, r.index, r.dirty_index, r.reset_index)
        return out

    def run(self, vcpu: int, pages: list[tuple[int, int]], exit_every: int = 1) -> int:
        """The guest dirties ``pages`` and leaves guest mode (I/O) every ``exit_every``
        pages; on a soft-full exit the VMM harvests every ring and resets. Returns the
        number of soft-full exits."""
        exits = 0
        for k, (slot, offset) in enumerate(pages, 1):
            self.push(vcpu, slot, offset)
            if exit_every and k % exit_every == 0 and self.enter(vcpu):
                exits += 1
                self.harvest()
                self.reset()
        return exits

    def events(self) -> np.ndarray:
        ev = empty(len(self._rows))
        if self._rows:
            cols = np.array(self._rows, dtype=np.int64).T
            ev["ts"], ev["kind"], ev["ring"] = cols[0], cols[1], cols[2]
            ev["dirty_index"], ev["reset_index"] = cols[3], cols[4]
            ev["slot"], ev["value"] = cols[5], cols[6]
            ev["tid"] = np.where(cols[2] >= 0, self.tid0 + cols[2], self.tid0)
        ev["pid"], ev["vm"] = self.pid, self.vm
        return ev


def bulk_stream(cycles: int, *, rings: int = 4, entries: int = 4096, pages: int = 1 << 18,
                reserved: int = KVM_DIRTY_RING_RSVD_ENTRIES, pid: int = 1000, vm: int = 7,
                seed: int = 1) -> np.ndarray:
    """A clean stream built with numpy: per cycle, the ``rings`` vCPUs push round robin
    until each has ``soft_limit`` entries, ring 0 takes a soft-full exit and the VMM
    harvests everything and resets every ring. ``cycles * rings * (soft_limit + 1) +
    cycles`` events; offsets are random pages below ``pages`` in slot 0."""
    limit = entries - reserved
    per = rings * limit  # pushes per cycle
    n_cycle = per + 1 + rings
    ev = np.zeros(cycles * n_cycle, dtype=EVENT_DTYPE)
    ev["pid"], ev["vm"] = pid, vm
    c = np.arange(cycles, dtype=np.int64)[:, None]
    j = np.arange(per, dtype=np.int64)[None, :]
    base = c * n_cycle
    push_pos = (base + j).ravel()
    ring = np.tile(j % rings, (cycles, 1)).ravel()
    di = (c * limit + j // rings + 1).ravel()
    ev["kind"][push_pos] = Kind.PUSH
    ev["ring"][push_pos] = ring
    ev["tid"][push_pos] = 2000 + ring
    ev["dirty_index"][push_pos] = di
    ev["reset_index"][push_pos] = ((c * limit) + 0 * j).ravel()
    ev["value"][push_pos] = np.random.default_rng(seed).integers(0, pages, push_pos.size)
    exit_pos = (base[:, 0] + per)
    ev["kind"][exit_pos] = Kind.EXIT
    ev["ring"][exit_pos] = 0
    ev["tid"][exit_pos] = 2000
    for r in range(rings):
        pos = base[:, 0] + per + 1 + r
        ev["kind"][pos] = Kind.RESET
        ev["ring"][pos] = r
        ev["tid"][pos] = 2000
        ev["dirty_index"][pos] = ev["reset_index"][pos] = (c[:, 0] + 1) * limit
    ev["ts"] = 1_000_000_000 + np.arange(ev.size, dtype=np.uint64) * 50
    return ev


def workload_stream(n: int, vcpus: int = 4, pattern: str = "seq", ring_entries: int = 512,
                    pages: int = 1 << 18, seed: int = 1, pid: int = 4321, vm: int = 11,
                    period_ns: int = 2_000_000, push_ns: int = 10_000) -> np.ndarray:
    """About ``n`` (at least n, then cut to n) events of a dirty-ring workload, time-ordered.

    Each vCPU pushes every ``push_ns`` on average (80 % fixed, 20 % exponential jitter);
    every 0.5-3 ``period_ns`` the VMM resets all rings (one RESET per ring, one RESET_LAT); a
    vCPU that reaches the soft limit (entries - 64) exits (EXIT) and stalls until that
    reset (STALL at the end of the stall, value = its ns). ``pattern`` "seq" walks pages in
    order per vCPU, "random" picks them at random.
    """
    rng = np.random.default_rng(seed)
    soft = soft_limit_of(ring_entries)
    t = 1_000_000_000
    dirty = [0] * vcpus
    reset = [0] * vcpus
    cursor = [i * (pages // vcpus) for i in range(vcpus)]
    clock = [t + int(rng.integers(0, push_ns)) for _ in range(vcpus)]
    stalled: list[int | None] = [None] * vcpus
    chunks: list[np.ndarray] = []
    head = empty(1)
    head[0] = (t - 1000, bytes_from_entries(ring_entries), pid, pid, 0, 0, 223, -1, vm,
               Kind.RING_SIZE, b"")
    chunks.append(head)
    total = 1
    while total < n:
        t_end = t + int(period_ns * rng.uniform(0.5, 3.0))
        guess = (t_end - t) // push_ns * 2 + 8
        for i in range(vcpus):
            tid = pid + 1 + i
            times = clock[i] + np.cumsum(
                (push_ns * 0.8 + rng.exponential(push_ns * 0.2, guess)).astype(np.int64))
            times = times[times < t_end]
            room = soft - (dirty[i] - reset[i])
            full = len(times) >= room
            k = min(len(times), room)
            times = times[:k]
            ev = empty(k + (1 if full else 0))
            if k:
                ev["ts"][:k] = times
                ev["dirty_index"][:k] = dirty[i] + 1 + np.arange(k)
                ev["reset_index"][:k] = reset[i]
                ev["kind"][:k] = Kind.PUSH
                if pattern == "seq":
                    ev["value"][:k] = (cursor[i] + np.arange(k)) % pages
                    cursor[i] = (cursor[i] + k) % pages
                else:
                    ev["value"][:k] = rng.integers(0, pages, k)
                dirty[i] += k
            if full:
                exit_ts = (int(times[-1]) if k else clock[i]) + 300
                ev[k] = (exit_ts, 0, pid, tid, dirty[i], reset[i], 0, i, vm, Kind.EXIT, b"")
                stalled[i] = exit_ts + 2000
                clock[i] = t_end + 50_000 + int(rng.integers(0, 5000))
            elif k:
                clock[i] = int(times[-1]) + push_ns
            ev["pid"] = pid
            ev["tid"] = tid
            ev["ring"] = i
            ev["vm"] = vm
            chunks.append(ev)
            total += len(ev)
        lat = 20_000 + int(rng.integers(0, 20_000))
        ev = empty(2 * vcpus + 1)
        for i in range(vcpus):
            entries = dirty[i] - reset[i]
            reset[i] = dirty[i]
            ev[i] = (t_end + 1000 + 500 * i, entries, pid, pid, dirty[i], reset[i], 0, i, vm,
                     Kind.RESET, b"")
            # the next period's pushes come after this ring's reset (their reset_index is
            # the new one): never before it, even with a push late in this period
            clock[i] = max(clock[i], t_end + 1001 + 500 * i)
        ev[vcpus] = (t_end + lat, lat, pid, pid, 0, 0, 0, -1, vm, Kind.RESET_LAT, b"")
        m = vcpus + 1
        for i in range(vcpus):
            if stalled[i] is not None:
                end = clock[i] - 1000
                ev[m] = (end, end - stalled[i], pid, pid + 1 + i, dirty[i], reset[i], 0, i, vm,
                         Kind.STALL, b"")
                m += 1
                stalled[i] = None
        chunks.append(ev[:m])
        total += m
        t = t_end
    out = np.concatenate(chunks)
    out = out[np.argsort(out["ts"], kind="stable")]
    return out[:n]


def write_bulk_recording(n: int, path: str | os.PathLike[str], *,
                         sizes_in_meta: bool = False) -> None:
    """``n`` events of :func:`bulk_stream` cycles (4 rings of 4096 entries) written as a
    recording chunk by chunk (bounded memory), each chunk shifted in time and in the u32
    indices (which wrap like the kernel's) so the file stays one clean trace.
    ``sizes_in_meta``: the ring size in the meta, as ``kvmtrace record`` writes it (else a
    replay learns it from the events)."""
    from ..core.kvm_abi import KVM_DIRTY_RING_RSVD_ENTRIES, u32
    from ..core.sources import SourceMeta
    from ..source.recording import RecordingWriter

    rings, entries, cycles = 4, 4096, 64
    chunk = bulk_stream(cycles, rings=rings, entries=entries)
    span = int(chunk["ts"][-1] - chunk["ts"][0]) + 50
    step = cycles * (entries - KVM_DIRTY_RING_RSVD_ENTRIES)
    meta = SourceMeta(kind="bench", ring_entries={(1000, 7): entries} if sizes_in_meta else {})
    written = k = 0
    with RecordingWriter(path, meta) as w:
        while written < n:
            part = chunk[: n - written].copy()
            part["ts"] += np.uint64(k * span)
            part["dirty_index"] += np.uint32(u32(k * step))
            part["reset_index"] += np.uint32(u32(k * step))
            w.write(part)
            written += len(part)
            k += 1


def write_workload_recording(path: str | os.PathLike[str], n: int, vcpus: int) -> int:
    """:func:`workload_stream` of ``n`` events written as ``kvmtrace record`` writes it: the
    ring sizes its RING_SIZE events set also in the meta. Returns the events written."""
    from ..core.events import ring_sizes
    from ..core.sources import SourceMeta
    from ..source.recording import RecordingWriter

    ev = workload_stream(n, vcpus=vcpus)
    with RecordingWriter(path, SourceMeta(kind="bench", ring_entries=ring_sizes(ev))) as w:
        w.write(ev)
    return len(ev)
