"""JSON of ``kvmtrace replay --json`` and of ``--dump-harvest``.

Schema 1 (counts in ring entries (``struct kvm_dirty_gfn``) or events; times in ns of the
trace's clock unless the name says ``_s``; unknown values are ``null``, never NaN)::

    {"schema": 1, "source": <"recording", "ftrace", "perf-script", ...>, "file": <path>,
     "events": <events read>, "lost": <lost events: the producer could not deliver them>,
     "truncated": <the recording ends early>, "reserved": <entries kept back: 64 or 576>,
     "start_ns", "end_ns": <first/last event of any ring; null without rings>,
     "clean": <no anomaly and no lost events>,
     "warnings": [<one line each: what the input could not tell, e.g. text rings not
                  told apart (their anomalies are left out)>],
     "vms": [{"pid", "vm", "vm_gen", "name" (the VM's name: QEMU -name guest=, libvirt
              domain, Firecracker --id, ...; null unknown), "vmm" (VMM kind: "qemu",
              "libvirt", "firecracker", "cloud-hypervisor", "kvmtrace"; null unknown),
              "comm" (the VMM's task name; null unknown), "rings", "pushes", "first_ns",
              "last_ns" (first and last push of any of its rings), "dirty_rate_mbps"
              (over that span)}]: one per VM of the rings (and per
              named VM without ring events, e.g. QEMU with dirty logging off), names
              as the recording's meta holds them (kvmtrace.host.vmnames); text traces and
              recordings older than format 1.2 carry none (all null),
     "rings": [{"pid" (0 unknown), "vm" (VM fd, -1 unknown; -2, -3, ...: VMs a text
                trace's rings were told apart into), "vm_gen" (VMs seen before it under
                that fd: 0, 1, ...), "name" (as in "vms"), "index" (kvm_dirty_ring.index),
                "size" (entries; null unknown), "size_source" ("trace", "meta",
                "inferred", "unknown"), "soft_limit" (null unknown), "pushes",
                "lost_pushes", "resets", "entries_reset", "soft_full_exits", "max_used",
                "dirty_index", "reset_index", "overwritten" (entries overwritten before a
                reset collected them), "stranded" (entries pushed while the ring is stuck:
                never collected), "stuck" (reset_index ends on a cleared entry with
                entries pushed: the ring can never be reset again), "lost_pages" ([[slot,
                offset, entries overwritten or stranded], ...]: distinct pages among the
                overwritten and stranded entries whose latest push was never collected,
                sorted, at most kvmtrace.model.results.LIST_CAP), "lost_page_count", "harvested",
                "harvested_unknown", "digest" (32 hex digits: harvested (slot, offset)
                multiset), "first_ns", "last_ns", "dirty_rate_mbps" (QEMU's dirty rate
                over the ring's first to last push: entries pushed per second x 4096 /
                2**20, MiB/s of 4 KiB pages; null with fewer than two push times),
                "stall": {"count", "total_ns", "p50_ns", "p99_ns", "max_ns"} (KT_STALL;
                percentiles exact: durations that occurred, the smallest with at least
                q of them at or below it; of a uniform sample beyond 10**6 values),
                "exit_to_push": {... the same, soft-full exit to the ring's next push}}],
     "anomalies": [{"kind", "ring": {"pid", "vm", "index"}, "time" (ns), "time_s" (from
                    start_ns), "dirty_index", "reset_index", "count", "detail" (one
                    sentence), "extra": {kind-specific numbers},
                    "entries": [[slot, offset], ...] (overflow: the overwritten ones,
                    at most kvmtrace.model.results.LIST_CAP)}],
     "workingset": {"window_ns", "rings": [{"pid", "vm", "index", "pushes", "rate_per_s",
                    "peak_rate_per_s", "dirty_rate_mbps", "peak_dirty_rate_mbps",
                    "distinct_mean", "distinct_max",
                    "windows": [[window index, pushes, distinct pages], ...],
                    "window_dirty_rate_mbps": [[window index, MB/s], ...]}]},
     "hottest": [{"pid", "vm", "vm_gen", "pages": [{"slot", "offset", "pushes"}]}],
     "simulation": null or {"entries", "soft_limit", "exits", "trace_exits",
                    "stall_ns" (estimate; null without a stall in the trace),
                    "assumptions": [...], "rings": [{"pid", "vm", "index", "exits",
                    "trace_exits", "stall_ns"}]},
     "migrations": [<live-migration iterations: kvmtrace.views.replay_migration>],
     "stall_split": [<per vCPU ring: soft-full stalls split into harvest and the time
                     after the vCPU's own reset (a dirty limit's throttle):
                     kvmtrace.views.replay_migration>],
     "reset_latency": {"count", "total_ns", "p50_ns", "p99_ns", "max_ns"}: every
                     KVM_RESET_DIRTY_RINGS ioctl of the trace (Kind.RESET_LAT, a vm
                     ioctl, so not per ring; recordings only: count 0 in text traces),
                     percentiles exact as for "stall"}

``--dump-harvest`` writes the shape of ``kvmtrace workload --dump-harvest``
(:meth:`kvmtrace.vmm.truth.WorkloadResult.harvest_dump`): ``{"pid", "vm_fd",
"ring_entries", "rings": [{"index", "harvested": [[slot, offset], ...]}]}``, with ``pid``,
``vm_fd`` and ``ring_entries`` null when the trace holds several VMs or does not say, and
``pid``/``vm`` on each ring as well. Entries are in the order resets collected them.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..analysis.migration import Migration
from ..analysis.rates import SpanRate, dirty_rate_mbps, span_rates, window_rates
from ..analysis.replay import ReplayReport
from ..analysis.throttle import StallSplit
from ..core.kvm_abi import vm_fd, vm_gen
from ..model.digest import digest_of
from ..model.results import Anomaly, Durations, RingId, RingResult
from .replay_migration import migration_dicts, stall_split_dicts

__all__ = ["SCHEMA", "report_dict", "dumps_report", "harvest_dump", "ring_dict", "vm_dicts",
           "anomaly_dict", "ring_span"]

SCHEMA = 1


def _num(x: float | None, nd: int = 3) -> float | None:
    """A JSON-safe float (None for unknown, NaN or infinite)."""
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


def _ring_ref(key: RingId) -> dict[str, int]:
    """pid, VM (its fd; ``vm_gen``: VMs seen before it under that fd) and ring index."""
    vm = int(key[1])
    return {"pid": int(key[0]), "vm": vm_fd(vm), "vm_gen": vm_gen(vm), "index": int(key[2])}


def _durations(d: Durations) -> dict[str, int | None]:
    return {"count": d.count, "total_ns": d.total_ns, "p50_ns": d.quantile_ns(0.5),
            "p99_ns": d.quantile_ns(0.99), "max_ns": d.max_ns if d.count else None}


def vm_dicts(report: ReplayReport, per_vm: dict[tuple[int, int], SpanRate]
             ) -> list[dict[str, Any]]:
    """``vms``: per (pid, vm) of the rings or named in the meta, its name, VMM kind and comm
    (null unknown), its rings, and its pushes over its active span with the dirty rate."""
    out = []
    for pid, vm in sorted({r.ring[:2] for r in report.rings} | set(report.vms)):
        who = report.vms.get((pid, vm))
        v = per_vm.get((pid, vm))
        out.append({"pid": pid, "vm": vm_fd(vm), "vm_gen": vm_gen(vm),
                    "name": who.name if who else None, "vmm": who.vmm if who else None,
                    "comm": (who.comm or None) if who else None,
                    "rings": sum(1 for r in report.rings if r.ring[:2] == (pid, vm)),
                    "pushes": v.pushes if v else 0,
                    "first_ns": v.first_ns if v else None,
                    "last_ns": v.last_ns if v else None,
                    "dirty_rate_mbps": _num(v.dirty_rate_mbps if v else None)})
    return out


def ring_dict(r: RingResult, reserved: int, name: str | None = None,
              rate: SpanRate | None = None) -> dict[str, Any]:
    """One entry of ``rings`` (``name``: its VM's, see ``vms``; ``rate``: its pushes over
    its active span)."""
    return {
        **_ring_ref(r.ring), "name": name,
        "size": r.size, "size_source": r.size_source,
        "soft_limit": None if r.size is None else r.size - reserved,
        "pushes": r.pushes, "lost_pushes": r.lost_pushes, "resets": r.resets,
        "entries_reset": r.entries_reset, "soft_full_exits": r.soft_full_exits,
        "max_used": r.max_used, "dirty_index": r.dirty_index, "reset_index": r.reset_index,
        "overwritten": r.overwritten, "stranded": r.stranded, "stuck": r.stuck,
        "lost_pages": [[int(s), int(o), int(n)] for s, o, n in r.lost_pages],
        "lost_page_count": r.lost_page_count, "harvested": r.harvested,
        "harvested_unknown": r.harvested_unknown,
        "digest": digest_of(r.harvested, r.harvest_sum1, r.harvest_sum2),
        "first_ns": r.first_ns, "last_ns": r.last_ns,
        "stall": _durations(r.stalls), "exit_to_push": _durations(r.exit_to_push),
        "dirty_rate_mbps": _num(rate.dirty_rate_mbps if rate else None),
    }


def _plain(v: Any) -> Any:
    if isinstance(v, bool | int | str) or v is None:
        return v
    if isinstance(v, float):
        return _num(v, 6)
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return str(v)


def anomaly_dict(a: Anomaly, start_ns: int | None) -> dict[str, Any]:
    """One entry of ``anomalies``."""
    out: dict[str, Any] = {
        "kind": a.kind.value, "ring": _ring_ref(a.ring), "time": a.time_ns,
        "time_s": None if start_ns is None else _num((a.time_ns - start_ns) / 1e9, 9),
        "dirty_index": a.dirty_index, "reset_index": a.reset_index, "count": a.count,
        "detail": a.detail, "extra": {k: _plain(v) for k, v in a.extra.items()},
    }
    if a.entries:
        out["entries"] = [[int(s), int(o)] for s, o in a.entries]
    return out


def ring_span(report: ReplayReport) -> tuple[int | None, int | None]:
    """First and last event time (ns) over all rings."""
    firsts = [r.first_ns for r in report.rings if r.first_ns is not None]
    lasts = [r.last_ns for r in report.rings if r.last_ns is not None]
    return (min(firsts) if firsts else None), (max(lasts) if lasts else None)


def _workingset(report: ReplayReport) -> dict[str, Any]:
    rings = []
    for key in sorted(report.workingset):
        ws = report.workingset[key]
        distinct = [w[2] for w in ws.windows]
        peak = max((w[1] for w in ws.windows), default=0)
        peak_rate = peak * 1e9 / report.window_ns if ws.windows else None
        rings.append({
            **_ring_ref(key), "pushes": ws.pushes, "rate_per_s": _num(ws.rate()),
            "peak_rate_per_s": _num(peak_rate),
            "dirty_rate_mbps": _num(dirty_rate_mbps(ws.rate())),
            "peak_dirty_rate_mbps": _num(dirty_rate_mbps(peak_rate)),
            "distinct_mean": _num(sum(distinct) / len(distinct)) if distinct else None,
            "distinct_max": max(distinct) if distinct else None,
            "windows": [[int(w), int(p), int(d)] for w, p, d in ws.windows],
            "window_dirty_rate_mbps": [[int(w), _num(m)]
                                       for w, m in window_rates(ws, report.window_ns)],
        })
    return {"window_ns": report.window_ns, "rings": rings}


def _simulation(report: ReplayReport) -> dict[str, Any] | None:
    sim = report.simulation
    if sim is None:
        return None
    actual = {r.ring: r.soft_full_exits for r in report.rings}
    stalls = [v for v in sim.stall_ns.values() if v is not None]
    return {
        "entries": sim.entries, "soft_limit": sim.soft_limit, "exits": sim.total_exits,
        "trace_exits": sum(actual.values()),
        "stall_ns": _num(sum(stalls), 0) if stalls else None,
        "assumptions": list(sim.assumptions),
        "rings": [{**_ring_ref(k), "exits": n, "trace_exits": actual.get(k, 0),
                   "stall_ns": _num(sim.stall_ns.get(k), 0)}
                  for k, n in sorted(sim.exits.items())],
    }


def report_dict(report: ReplayReport, *, file: str | None = None, top: int = 10,
                truncated: bool = False, warnings: list[str] | None = None,
                migrations: list[Migration] | None = None,
                stall_splits: list[StallSplit] | None = None,
                reset_latency: Durations | None = None) -> dict[str, Any]:
    """The whole ``--json`` object (schema 1, see the module docstring); ``migrations``:
    :func:`kvmtrace.analysis.migration.find_migrations` of the same trace;
    ``reset_latency``: the trace's KVM_RESET_DIRTY_RINGS durations (None: none)."""
    start, end = ring_span(report)
    per_ring, per_vm = span_rates(report.workingset)
    return {
        "schema": SCHEMA, "source": report.source_kind, "file": file,
        "events": report.events, "lost": report.lost, "truncated": truncated,
        "reserved": report.reserved, "start_ns": start, "end_ns": end,
        "clean": report.clean, "warnings": list(warnings or []),
        "vms": vm_dicts(report, per_vm),
        "rings": [ring_dict(r, report.reserved, _name(report, r.ring), per_ring.get(r.ring))
                  for r in report.rings],
        "anomalies": [anomaly_dict(a, start) for a in report.anomalies],
        "workingset": _workingset(report),
        "hottest": [{"pid": pid, "vm": vm_fd(vm), "vm_gen": vm_gen(vm),
                     "pages": [{"slot": p.slot, "offset": p.offset, "pushes": p.pushes}
                               for p in pages[:top]]}
                    for (pid, vm), pages in sorted(report.hottest.items())],
        "simulation": _simulation(report),
        "migrations": migration_dicts(migrations or []),
        "stall_split": stall_split_dicts(stall_splits or []),
        "reset_latency": _durations(reset_latency or Durations()),
    }


def _name(report: ReplayReport, ring: RingId) -> str | None:
    who = report.vms.get((ring[0], ring[1]))
    return who.name if who else None


def dumps_report(report: ReplayReport, **kw: Any) -> str:
    """:func:`report_dict` as one line of strict JSON."""
    return json.dumps(report_dict(report, **kw), allow_nan=False)


def harvest_dump(report: ReplayReport) -> dict[str, Any]:
    """Per ring, every harvested [slot, offset] in collection order (needs a replay with
    ``keep_harvest=True``); the shape of ``kvmtrace workload --dump-harvest``."""
    harvested = report.harvested or {}
    vms = {r.ring[:2] for r in report.rings}
    sizes = {r.size for r in report.rings}
    one = next(iter(vms)) if len(vms) == 1 else None
    return {
        "pid": one[0] if one and one[0] else None,
        "vm_fd": vm_fd(one[1]) if one and one[1] >= 0 else None,
        "ring_entries": next(iter(sizes)) if len(sizes) == 1 else None,
        "rings": [{**_ring_ref(r.ring),
                   "harvested": [[int(s), int(o)] for s, o in harvested.get(r.ring, [])]}
                  for r in report.rings],
    }
