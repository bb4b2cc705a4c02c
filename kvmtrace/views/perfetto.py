"""Perfetto timeline export, in the Chrome JSON trace format (the Perfetto UI opens it).

Each VMM process (pid) is named after its VM where the meta says (``web01 (qemu pid
4242)``; format 1.2 recordings), else ``VMM 4242``, and gets one thread-like track per
(vm, ring) -- synthetic thread ids
from :data:`TRACK_TID_BASE` up, named ``vm V ring R`` (``vm V`` for VM-wide events) -- with:

- a counter ``vm V ring R used`` (``args.used`` = dirty_index - reset_index, entries of
  ``struct kvm_dirty_ring`` in use) sampled from push and reset events: at most one sample
  per ``counter_interval_ns`` per ring, plus the sample just before and at every reset, so
  the saw-tooth's peaks are exact; 0 keeps every sample;
- a slice ``soft-full stall`` for each STALL event (ends at its ts, lasts ``value`` ns);
- an instant ``reset`` per kvm_dirty_ring_reset (``args.entries_reset``: reset_index
  advance since the ring's previous event, when known), and ``soft-full exit`` per exit;
- on the VM-wide track: ``KVM_RESET_DIRTY_RINGS`` slices (RESET_LAT) and ``ring size``
  instants (RING_SIZE);
- with ``migrations`` (:mod:`kvmtrace.analysis.migration`): a ``vm V migration`` track per
  sync thread with one slice ``iteration N`` per window between two syncs (``args``: pages,
  harvested entries, dirty and sent MB/s, converging, pages per vCPU ring), an instant
  ``sync N`` at each sync, and a counter ``vm V dirty pages`` per iteration.

Timestamps are CLOCK_MONOTONIC in µs with ns decimals. The JSON is streamed: memory stays
bounded by one batch of events.
"""

from __future__ import annotations

import json
import math
import os
from typing import IO, Any

import numpy as np

from ..analysis.migration import Migration
from ..core.events import Kind
from ..core.kvm_abi import entries_from_bytes, u32
from ..core.sources import EventSource
from ..host.outfile import atomic_output
from ..source.recording import meta_to_dict

__all__ = ["TRACK_TID_BASE", "MIGRATION_RING", "export_perfetto"]

TRACK_TID_BASE = 1_000_000_000  # synthetic tids of ring tracks (above any real tid)
MIGRATION_RING = -2  #: the track key's ring of a VM's migration track


def _round(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 3)


def _us(ns: int) -> str:
    return f"{ns // 1000}.{ns % 1000:03d}"


class _Track:
    __slots__ = ("tid", "name", "last_ts", "last_used", "last_emitted", "last_reset_index",
                 "bucket")

    def __init__(self, tid: int, name: str) -> None:
        self.tid = tid
        self.name = name
        self.last_ts = -1  # last push/reset event seen
        self.last_used = 0
        self.last_emitted = True
        self.last_reset_index: int | None = None
        self.bucket = -1


class _PerfettoWriter:
    def __init__(self, out: IO[str], source: EventSource, interval_ns: int) -> None:
        self.out = out
        self.meta = source.meta
        self.interval = max(0, int(interval_ns))
        self.tracks: dict[tuple[int, int, int], _Track] = {}
        self.pids: set[int] = set()
        self.count = 0
        self.first = True

    def emit(self, text: str) -> None:
        self.out.write(text if self.first else ",\n" + text)
        self.first = False
        self.count += 1

    def track(self, pid: int, vm: int, ring: int) -> _Track:
        key = (pid, vm, ring)
        tr = self.tracks.get(key)
        if tr is not None:
            return tr
        if pid not in self.pids:
            self.pids.add(pid)
            self.emit(json.dumps({"ph": "M", "pid": pid, "name": "process_name",
                                  "args": {"name": self.process_name(pid, vm)}}))
        vm_name = f"vm {vm}" if vm >= 0 else "vm ?"
        name = f"{vm_name} ring {ring}" if ring >= 0 else vm_name
        if ring == MIGRATION_RING:
            name = f"{vm_name} migration"
        size = self.meta.ring_size(pid, vm)
        label = f"{name} ({size} entries)" if size and ring >= 0 else name
        tr = _Track(TRACK_TID_BASE + len(self.tracks), name)
        self.tracks[key] = tr
        self.emit(json.dumps({"ph": "M", "pid": pid, "tid": tr.tid, "name": "thread_name",
                              "args": {"name": label}}))
        self.emit(json.dumps({"ph": "M", "pid": pid, "tid": tr.tid, "name": "thread_sort_index",
                              "args": {"sort_index": ring + 1}}))
        return tr

    def process_name(self, pid: int, vm: int) -> str:
        """``NAME (KIND pid P)`` when the meta names the VM (format 1.2 recordings), else
        ``COMM (VMM pid P)`` or ``VMM P``."""
        who = self.meta.vm_name(pid, vm)
        if who is not None and who.name:
            return f"{who.name} ({who.vmm or 'VMM'} pid {pid})"
        if who is not None and who.comm:
            return f"{who.comm} (VMM pid {pid})"
        return f"VMM {pid}"

    def counter(self, pid: int, tr: _Track, ts: int, used: int) -> None:
        self.emit(f'{{"ph":"C","pid":{pid},"tid":{tr.tid},"ts":{_us(ts)},'
                  f'"name":"{tr.name} used","args":{{"used":{used}}}}}')

    def batch(self, ev: np.ndarray) -> None:
        keys = np.unique(ev[["pid", "vm", "ring"]])
        for key in keys:
            pid, vm, ring = int(key["pid"]), int(key["vm"]), int(key["ring"])
            mask = (ev["pid"] == pid) & (ev["vm"] == vm) & (ev["ring"] == ring)
            self.ring_events(pid, self.track(pid, vm, ring), ev[mask])

    def ring_events(self, pid: int, tr: _Track, ev: np.ndarray) -> None:
        kind = ev["kind"]
        idx = (kind == Kind.PUSH) | (kind == Kind.RESET)
        if idx.any():
            self.used_samples(pid, tr, ev[idx])
        for e in ev[~idx]:
            k, ts, value = int(e["kind"]), int(e["ts"]), int(e["value"])
            if k == Kind.STALL:
                self.slice(pid, tr, "soft-full stall", ts, value)
            elif k == Kind.RESET_LAT:
                self.slice(pid, tr, "KVM_RESET_DIRTY_RINGS", ts, value)
            elif k == Kind.EXIT:
                self.instant(pid, tr, "soft-full exit", ts, {})
            elif k == Kind.RING_SIZE:
                self.instant(pid, tr, "ring size", ts,
                             {"bytes": value, "entries": entries_from_bytes(value),
                              "cap": int(e["slot"])})

    def slice(self, pid: int, tr: _Track, name: str, end: int, dur: int) -> None:
        start = max(0, end - dur)
        self.emit(f'{{"ph":"X","pid":{pid},"tid":{tr.tid},"ts":{_us(start)},'
                  f'"dur":{_us(end - start)},"name":"{name}","args":{{"ns":{dur}}}}}')

    def instant(self, pid: int, tr: _Track, name: str, ts: int, args: dict[str, Any]) -> None:
        self.emit(f'{{"ph":"i","s":"t","pid":{pid},"tid":{tr.tid},"ts":{_us(ts)},'
                  f'"name":"{name}","args":{json.dumps(args)}}}')

    def used_samples(self, pid: int, tr: _Track, ev: np.ndarray) -> None:
        ts = ev["ts"].astype(np.int64)
        used = (ev["dirty_index"] - ev["reset_index"]).astype(np.int64)  # u32 wrap
        reset = ev["kind"] == Kind.RESET
        if self.interval:
            bucket = ts // self.interval
            prev = np.concatenate(([tr.bucket], bucket[:-1]))
            keep = (bucket != prev) | reset
            keep[:-1] |= reset[1:]  # the peak just before a reset
        else:
            keep = np.ones(len(ev), bool)
        if reset[0] and not tr.last_emitted and tr.last_ts >= 0:
            self.counter(pid, tr, tr.last_ts, tr.last_used)
        resets = set(np.flatnonzero(reset).tolist())
        prev_reset = tr.last_reset_index
        ri = ev["reset_index"]
        for i in np.flatnonzero(keep | reset).tolist():
            if keep[i]:
                self.counter(pid, tr, int(ts[i]), int(used[i]))
            if i in resets:
                before = prev_reset if i == 0 else int(ri[i - 1])
                args: dict[str, Any] = {"dirty_index": int(ev["dirty_index"][i]),
                                        "reset_index": int(ri[i])}
                if before is not None:
                    args["entries_reset"] = u32(int(ri[i]) - before)
                self.instant(pid, tr, "reset", int(ts[i]), args)
        tr.last_ts, tr.last_used = int(ts[-1]), int(used[-1])
        tr.last_emitted = bool(keep[-1])
        tr.last_reset_index = int(ri[-1])
        if self.interval:
            tr.bucket = int(bucket[-1])

    def migration(self, mig: Migration) -> None:
        """The iterations of one sync thread on a track of their own."""
        tr = self.track(mig.pid, mig.vm, MIGRATION_RING)
        vm_name = f"vm {mig.vm}" if mig.vm >= 0 else "vm ?"
        for it in mig.iterations:
            args = {"pages": it.pages, "collected": it.collected, "harvested": it.harvested,
                    "dirty_rate_mbps": _round(it.dirty_rate_mbps),
                    "sent_pages": it.sent_pages,
                    "transfer_rate_mbps": _round(it.transfer_rate_mbps),
                    "converging": it.converging,
                    "pages_per_ring": {str(r.ring): r.pages for r in it.rings},
                    "resets_by_vcpus": it.other_resets.get("vcpu", 0),
                    "resets_by_reaper": it.other_resets.get("reaper", 0)}
            start = max(0, it.start_ns)
            self.emit(f'{{"ph":"X","pid":{mig.pid},"tid":{tr.tid},"ts":{_us(start)},'
                      f'"dur":{_us(it.ts - start)},"name":"iteration {it.number}",'
                      f'"args":{json.dumps(args)}}}')
            self.instant(mig.pid, tr, f"sync {it.number}", it.ts, {"thread": mig.tid})
            self.emit(f'{{"ph":"C","pid":{mig.pid},"tid":{tr.tid},"ts":{_us(it.ts)},'
                      f'"name":"{vm_name} dirty pages","args":{{"pages":{it.pages}}}}}')

    def finish(self) -> None:
        for (pid, _, _), tr in self.tracks.items():  # the last value of every ring
            if not tr.last_emitted and tr.last_ts >= 0:
                self.counter(pid, tr, tr.last_ts, tr.last_used)


def export_perfetto(source: EventSource, path: str | os.PathLike[str], *,
                    counter_interval_ns: int = 100_000,
                    migrations: list[Migration] | None = None) -> int:
    """Write ``source`` as a Chrome JSON trace; returns the number of trace events.
    ``migrations``: :func:`kvmtrace.analysis.migration.find_migrations` of the same trace,
    drawn on a track of their own."""
    with atomic_output(path, text=True) as dest:
        out = dest.file
        out.write('{"displayTimeUnit":"ns","traceEvents":[\n')
        w = _PerfettoWriter(out, source, counter_interval_ns)
        for ev in source.batches():
            if len(ev):
                w.batch(ev)
        w.finish()
        for mig in migrations or []:
            w.migration(mig)
        meta = meta_to_dict(source.meta)
        meta["lost"] = int(source.lost)
        out.write("\n],\n\"metadata\":" + json.dumps({"kvmtrace": meta}, default=str) + "}\n")
    return w.count
