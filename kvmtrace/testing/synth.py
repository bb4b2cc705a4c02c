"""Synthetic dirty-ring event streams, made by driving :class:`~.ring.DirtyRing` models.

:class:`SynthVm` is a scripted VM (one ring per vCPU) whose every kernel-side step emits the
event the real tracepoint would: ``push`` (after dirty_index++), ``exit`` (soft-full exit at
guest entry), ``reset`` (one event per ring per KVM_RESET_DIRTY_RINGS). Tests use it to
build streams with known anomalies. :func:`bulk_stream` builds large, clean streams with
numpy for throughput measurements.
"""

from __future__ import annotations

import numpy as np

from ..core.events import EVENT_DTYPE, Kind, empty
from ..core.kvm_abi import KVM_DIRTY_RING_RSVD_ENTRIES, bytes_from_entries
from ..model.ring import DirtyRing

__all__ = ["SynthVm", "bulk_stream"]


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
