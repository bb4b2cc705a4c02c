"""Batch JSON of ``kvmtrace top -b --json``: one object per interval, one line each (NDJSON).

Schema 1.1 (all counts in ring entries or events; times in ns unless the name says ``_s``)::

    {"schema": 1, "schema_minor": 1, "mode": "full" | "light",
     "time": <unix seconds; null when unknown (a trace without a start time)>,
     "time_ns": <source clock: CLOCK_MONOTONIC live, the trace's clock for files>,
     "interval_s": <seconds>, "lost_events": <cumulative>,
     "rings": [{"pid", "vm", "vm_gen", "index", "size" (entries, null unknown), "used", "max_used",
                "fill_pct" (null unknown), "pushes", "soft_full_exits", "resets",
                "entries_reset", "lost" (lost pages: overwritten + stranded), "stranded",
                "stuck" (bool), "stuck_reason" (null, "stranded", "no_reset_progress" or
                "overflow": kvmtrace.analysis.stuck), "stall_ns" (cumulative since start),
                "push_rate", "exit_rate", "reset_rate", "lost_rate" (per second),
                "dirty_rate_mbps" (QEMU's dirty rate: entries pushed per second x 4096 /
                2**20, MiB of 4 KiB pages per second; compare calc-dirty-rate),
                "entries_per_reset" (interval; null without resets),
                "stall_p50_le_ns", "stall_p99_le_ns", "reset_p99_le_ns" (interval; null
                if none): upper bounds, the top of the log2 bucket holding that
                percentile (only the in-kernel log2 histogram exists live; exact
                percentiles: ``kvmtrace replay`` of a recording),
                "stall_p50_ns", "stall_p99_ns", "reset_p99_ns": the same values under
                their schema-1.0 names, kept for readers of 1.0,
                "stall_hist" (cumulative log2 buckets: [i] counts 2**i <= ns < 2**(i+1))}],
     "vms": [{"pid", "vm", "vm_gen", "comm", "name", "ring_bytes", "rings", and the ring fields
              summed over the VM's rings ("resets" counts ring resets: one per ring per
              KVM_RESET_DIRTY_RINGS ioctl)}],
     "idle_vms": [{"pid", "vm", "vm_gen", "comm", "name", "ring_bytes"}: VMs with a dirty
              ring of known size and no ring event yet (QEMU: dirty logging off)]}

Minor 1 added ``schema_minor`` and the ``_le_ns`` names; a reader of 1.0 sees what it knew.
``mode`` is ``light`` for ``top --light`` (no push probe): a ring's pushes, used, max_used
and lost (pages) are then updated at its resets only, so they lag by up to one harvest cycle and
push_rate is the dirty_index advance seen at the interval's resets; ``full`` otherwise.
A VM's ``stuck``/``stuck_reason`` is its most serious ring's. ``lost`` counts lost pages:
ring entries overwritten by an overflow before a reset plus stranded by a stuck ring.
``vm`` is the VM's file descriptor in the VMM process (-1 unknown) and ``vm_gen`` the VMs
seen under that fd before this one (the fd was reused: kvmtrace.core.kvm_abi); ``index`` is
``kvm_dirty_ring.index`` (the vCPU index, -1 unknown).
"""

from __future__ import annotations

import json
from typing import Any

from ..analysis.rates import Interval, RingRates, VmRates
from ..core.kvm_abi import vm_fd, vm_gen

__all__ = ["SCHEMA", "SCHEMA_MINOR", "ring_json", "vm_json", "interval_json", "dumps_interval"]

SCHEMA = 1
SCHEMA_MINOR = 1  #: 1: the percentile upper bounds also under ``*_le_ns`` names


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def ring_json(r: RingRates) -> dict[str, Any]:
    """One ring's entry of ``rings``."""
    return {
        "pid": r.pid,
        "vm": vm_fd(r.vm),
        "vm_gen": vm_gen(r.vm),
        "index": r.index,
        "size": r.size,
        "used": r.used,
        "max_used": r.max_used,
        "fill_pct": _round(r.fill_pct),
        "pushes": r.pushes,
        "soft_full_exits": r.soft_full_exits,
        "resets": r.resets,
        "entries_reset": r.entries_reset,
        "lost": r.lost,
        "stranded": r.stranded,
        "stuck": r.stuck is not None,
        "stuck_reason": r.stuck,
        "stall_ns": r.stall_ns,
        "push_rate": _round(r.push_rate),
        "dirty_rate_mbps": _round(r.dirty_rate_mbps),
        "exit_rate": _round(r.exit_rate),
        "reset_rate": _round(r.reset_rate),
        "lost_rate": _round(r.lost_rate),
        "entries_per_reset": _round(r.entries_per_reset),
        "stall_p50_le_ns": r.stall_p50_ns,
        "stall_p99_le_ns": r.stall_p99_ns,
        "reset_p99_le_ns": r.reset_p99_ns,
        "stall_p50_ns": r.stall_p50_ns,  # schema 1.0 names of the same upper bounds
        "stall_p99_ns": r.stall_p99_ns,
        "reset_p99_ns": r.reset_p99_ns,
        "stall_hist": r.stall_hist_total,
    }


def vm_json(v: VmRates) -> dict[str, Any]:
    """One VM's entry of ``vms``: identity plus the ring fields summed."""
    out: dict[str, Any] = {
        "pid": v.pid,
        "vm": vm_fd(v.vm),
        "vm_gen": vm_gen(v.vm),
        "comm": v.comm,
        "name": v.name,
        "ring_bytes": v.ring_bytes,
        "rings": v.rings,
    }
    body = ring_json(v)
    del body["pid"], body["vm"], body["vm_gen"], body["index"]
    out.update(body)
    return out


def interval_json(iv: Interval, *, wall_time: float | None = None,
                  mode: str = "full") -> dict[str, Any]:
    """The schema-1 object of one interval; ``wall_time`` (unix seconds) or null."""
    return {
        "schema": SCHEMA,
        "schema_minor": SCHEMA_MINOR,
        "mode": mode,
        "time": None if wall_time is None else round(wall_time, 3),
        "time_ns": iv.time_ns,
        "interval_s": round(iv.interval_s, 6),
        "lost_events": iv.lost_events,
        "rings": [ring_json(r) for r in iv.rings],
        "vms": [vm_json(v) for v in iv.vms],
        "idle_vms": [{"pid": i.pid, "vm": vm_fd(i.vm), "vm_gen": vm_gen(i.vm), "comm": i.comm,
                      "name": i.name, "ring_bytes": i.ring_bytes} for i in iv.idle],
    }


def dumps_interval(iv: Interval, *, wall_time: float | None = None, mode: str = "full") -> str:
    """One NDJSON line (no trailing newline)."""
    return json.dumps(interval_json(iv, wall_time=wall_time, mode=mode), separators=(",", ":"))
