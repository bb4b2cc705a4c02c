"""Common part of the ftrace and ``perf script`` importers: an EventSource over a text file.

The file is read in chunks cut at line ends and scanned with :func:`~.textscan.scan`,
twice: a first pass gives :mod:`.textvms` the whole trace to tell VMs apart, the second
yields the events (from memory when they fit in :attr:`TextSource.cache_bytes`, 256 MiB =
5.6 M events, else by reading the file again). Memory: a chunk (16 MiB of text), the
cached events, and while solving 16 bytes per push and 48 per reset. What the text can
and cannot tell:

- ``ts``: the printed ``seconds.fraction`` in ns (the trace clock, ``local`` by default for
  tracefs, perf's ``perf_clock``; comparable within one file only).
- ``tid``: the printed thread id. ``pid`` (the VMM's tgid) only when printed (tracefs
  ``options/record-tgid``, ``perf script -F pid,tid,...``); otherwise 0 = unknown for every
  event, so a trace of several VMMs looks like one process (resets of a VM come from any
  of its threads, so a thread id cannot stand in for the process).
- ``vm``: the text does not say which VM a ring belongs to. When one ring index of a
  process is pushed by several threads (several VMs, or a VM closed and another created),
  :mod:`.textvms` tells the rings apart by thread and index continuity and numbers the
  VMs -2, -3, ...; :attr:`TextSource.warnings` says where it could not. Otherwise ``vm``
  is -1 (unknown).
- a soft-full exit is ``kvm_dirty_ring_exit`` (ring = its ``vcpu_id``; this assumes
  vcpu_id equals the ring index ``vcpu_idx``, true for kvmtrace's own VMM and for VMMs
  that number vCPUs from 0 in creation order) or, when that event was not recorded,
  ``kvm_userspace_exit`` with reason 31 (ring = the one the same thread last pushed to).
  When both are recorded, the second one of a pair (same thread) is dropped.
- ring sizes are not in the text: ``ring_entries``/``ring_bytes`` supply a default
  (:attr:`SourceMeta.ring_entries` key (-1, -1)); the replay infers the rest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..core.events import EVENT_DTYPE, Kind
from ..core.kvm_abi import (
    KVM_DIRTY_RING_MAX_ENTRIES,
    MIN_RING_BYTES,
    MIN_RING_ENTRIES,
    VM_UNKNOWN,
    entries_from_bytes,
)
from ..core.sources import EventSource, SourceMeta
from ..errors import UsageError
from .textscan import K_DREXIT, K_PUSH, K_RESET, K_UEXIT, Scanned, scan
from .textvms import TextVms

__all__ = ["TextSource", "resolve_ring_entries"]

_LOST = re.compile(rb"CPU:\s*\d+ \[LOST (\d+) EVENTS\]")


def resolve_ring_entries(ring_entries: int | None, ring_bytes: int | None) -> int | None:
    """Entries from ``--ring-entries`` / ``--ring-bytes`` (either or both, must agree)."""
    from_bytes = None
    if ring_bytes is not None:
        if ring_bytes < MIN_RING_BYTES or ring_bytes & (ring_bytes - 1):
            raise UsageError(f"--ring-bytes {ring_bytes} is not a power of two >= 4096",
                             "give the ring bytes the VMM enabled, e.g. --ring-bytes 65536")
        from_bytes = entries_from_bytes(ring_bytes)
    if ring_entries is not None:
        if ring_entries < MIN_RING_ENTRIES or ring_entries & (ring_entries - 1):
            raise UsageError(f"--ring-entries {ring_entries} is not a power of two >= 256",
                             "one entry is 16 bytes: --ring-entries 4096 = 64 KiB")
        if from_bytes is not None and from_bytes != ring_entries:
            raise UsageError(f"--ring-entries {ring_entries} and --ring-bytes {ring_bytes} "
                             "disagree", "give only one of them")
        from_bytes = ring_entries
    if from_bytes is not None and from_bytes > KVM_DIRTY_RING_MAX_ENTRIES:
        raise UsageError(f"ring of {from_bytes} entries is above KVM's maximum 65536",
                         "use at most --ring-bytes 1048576")
    return from_bytes


class TextSource(EventSource):
    """EventSource over a tracefs or ``perf script`` text file (see module docstring)."""

    kind = "text"
    perf = False

    def __init__(self, path: str | os.PathLike[str], *, ring_entries: int | None = None,
                 ring_bytes: int | None = None, chunk_bytes: int = 16 << 20,
                 name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or str(path)  #: what messages call the file (``-``: stdin)
        if not self.path.is_file():
            raise UsageError(f"cannot read {self.path}: no such file",
                             "give the path of a trace file")
        entries = resolve_ring_entries(ring_entries, ring_bytes)
        self.meta = SourceMeta(
            kind=self.kind,
            ring_entries={(-1, -1): entries} if entries else {},
            extra={"path": str(self.path)},
        )
        self.chunk_bytes = max(1 << 16, chunk_bytes)
        self._lost = 0
        self.bad_lines = 0  #: lines naming a dirty-ring event that could not be parsed
        self.other_lines = 0  #: dirty-ring lines in the other text format (skipped)
        self.dropped_exits = 0  #: kvm_userspace_exit(31) paired with kvm_dirty_ring_exit
        self._lone = False  # an exit 31 came without kvm_dirty_ring_exit
        self.cache_bytes = 256 << 20  #: events kept between the two reads of the file
        self._warnings: list[str] = []
        self._unsure: set[tuple[int, int, int]] = set()
        self.separated = False  #: rings of several VMs were told apart (vm -2, -3, ...)
        self.unplaced = 0  #: reset events no VM could be named for (under vm -1)
        self.events: int | None = None  #: events batches() yields, known after its first read

    @property
    def lost(self) -> int:
        """Lost events: events the kernel reported dropped (tracefs ``[LOST n EVENTS]``
        lines)."""
        return self._lost

    @property
    def warnings(self) -> list[str]:
        """One line each: what the text could not tell (e.g. rings not told apart)."""
        return self._warnings

    @property
    def unsure(self) -> set[tuple[int, int, int]]:
        """(pid, vm, index) of rings whose resets the text could not tell apart."""
        return self._unsure

    def batches(self) -> Iterator[np.ndarray]:
        """Events chunk by chunk, each chunk in time order, ``vm`` set by
        :class:`~.textvms.TextVms` (the file is read twice unless its events fit in
        :attr:`cache_bytes`)."""
        vms = TextVms()
        cache: list[np.ndarray] | None = []
        held = n = 0
        for ev in self._read():
            n += len(ev)
            vms.observe(ev)
            if cache is not None:
                held += ev.nbytes
                cache = cache + [ev] if held <= self.cache_bytes else None
        vms.solve()
        self.events = n
        self._warnings = self._line_warnings() + list(vms.warnings)
        self._unsure = set(vms.unsure)
        self.unplaced = vms.unplaced
        self.separated = vms.needed
        nres = 0
        for ev in (cache if cache is not None else self._read()):
            nres += vms.assign(ev, nres)
            yield ev

    def _line_warnings(self) -> list[str]:
        """Lines skipped by the first read, said with their counts (never dropped quietly)."""
        out = []
        if self.bad_lines:
            out.append(f"{self.name}: {self.bad_lines} lines naming a dirty-ring event could "
                       "not be parsed and were skipped")
        if self.other_lines:
            this, other = ("perf script", "tracefs") if self.perf else ("tracefs", "perf script")
            out.append(f"{self.name}: {self.other_lines} dirty-ring lines in {other} format "
                       f"in a {this} trace were skipped (give each format in its own file)")
        return out

    def _read(self) -> Iterator[np.ndarray]:
        self._lost = self.bad_lines = self.other_lines = self.dropped_exits = 0
        self._lone = False
        pending: set[int] = set()  # tids whose kvm_dirty_ring_exit awaits its exit 31
        tid_ring: dict[int, int] = {}
        rest = b""
        with open(self.path, "rb") as f:
            while True:
                data = f.read(self.chunk_bytes)
                if not data:
                    break
                data = rest + data
                cut = data.rfind(b"\n") + 1
                if not cut:
                    rest = data
                    continue
                rest = data[cut:]
                ev = self._chunk(data[:cut], pending, tid_ring)
                if len(ev):
                    yield ev
        if rest.strip():
            ev = self._chunk(rest + b"\n", pending, tid_ring)
            if len(ev):
                yield ev

    def _chunk(self, buf: bytes, pending: set[int], tid_ring: dict[int, int]) -> np.ndarray:
        if b"[LOST " in buf:
            self._lost += sum(int(m) for m in _LOST.findall(buf))
        sc = scan(buf, self.perf)
        self.bad_lines += sc.bad
        self.other_lines += buf.count(b": kvm_dirty_ring_" if self.perf
                                      else b"kvm:kvm_dirty_ring_")
        keep = self._exits(sc, pending, tid_ring)
        n = len(sc.kind) if keep is None else int(keep.sum())
        ev = np.zeros(n, dtype=EVENT_DTYPE)
        sel = slice(None) if keep is None else keep
        kind = sc.kind[sel]
        ev["ts"] = sc.ts[sel]
        ev["pid"] = sc.pid[sel]
        ev["tid"] = sc.tid[sel]
        ev["ring"] = sc.ring[sel]
        ev["vm"] = VM_UNKNOWN
        ev["dirty_index"] = sc.di[sel]
        ev["reset_index"] = sc.ri[sel]
        is_push = kind == K_PUSH
        ev["slot"] = np.where(is_push, sc.slot[sel], 0)
        ev["value"] = np.where(is_push, sc.off[sel], np.uint64(0))
        exits = (kind == K_DREXIT) | (kind == K_UEXIT)
        ev["slot"][exits] = np.maximum(sc.ring[sel][exits], 0)
        ev["kind"] = np.select([is_push, kind == K_RESET, exits],
                               [Kind.PUSH, Kind.RESET, Kind.EXIT], 0)
        ts = ev["ts"]
        if len(ts) > 1 and (ts[1:] < ts[:-1]).any():
            ev = ev[np.argsort(ts, kind="stable")]
        return ev

    def _exits(self, sc: Scanned, pending: set[int], tid_ring: dict[int, int]
               ) -> np.ndarray | None:
        """Pair kvm_dirty_ring_exit with kvm_userspace_exit(31) per thread; give a lone
        exit 31 the ring its thread pushed to last. Returns a keep mask (None: all)."""
        xs = np.flatnonzero(sc.kind >= K_DREXIT)
        pushes = np.flatnonzero(sc.kind == K_PUSH) if len(xs) or self._lone else None
        keep = None
        for i in xs.tolist():
            tid = int(sc.tid[i])
            if sc.kind[i] == K_DREXIT:
                pending.add(tid)
                continue
            if keep is None:
                keep = np.ones(len(sc.kind), bool)
            if tid in pending:
                pending.discard(tid)
                keep[i] = False
                self.dropped_exits += 1
                continue
            self._lone = True
            assert pushes is not None
            before = pushes[pushes < i]
            mine = before[sc.tid[before] == tid]
            if len(mine):
                tid_ring[tid] = int(sc.ring[mine[-1]])
            sc.ring[i] = tid_ring.get(tid, -1)
        if self._lone and pushes is not None and len(pushes):
            tids = sc.tid[pushes][::-1]
            uniq, first = np.unique(tids, return_index=True)
            rings = sc.ring[pushes][::-1][first]
            tid_ring.update(zip(uniq.tolist(), rings.tolist(), strict=True))
        return keep
