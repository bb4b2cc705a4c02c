"""Live-migration iterations (:mod:`kvmtrace.analysis.migration`) for ``replay``: the
``migrations`` list of ``--json`` and the text section.

JSON (one object per sync thread of a VM)::

    {"pid", "vm" (fd), "vm_gen", "tid" (the sync thread), "vcpu_tids", "reaper_tids",
     "syncs" (syncs that reset the rings: QEMU's dirty-sync-count, less its syncs that
     collected nothing), "stopped" (no push after the last sync),
     "verdict" (one sentence),
     "iterations": [{"number", "ts" (ns), "start_ns", "duration_ns", "collected" (entries
                     the sync's own reset collected), "harvested" (entries, any thread),
                     "pages" (distinct 4 KiB pages dirtied in the window),
                     "dirty_rate_mbps", "sent_pages" (pages QEMU sent in the window, the
                     previous window's; null before iteration 3), "transfer_rate_mbps",
                     "converging" (pages < sent_pages; null unknown),
                     "other_resets": {"vcpu", "reaper"},
                     "rings": [{"index", "harvested", "pages", "pushes",
                                "soft_full_exits", "stall_ns"}]}]}
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

from ..analysis.migration import Iteration, Migration
from ..analysis.throttle import THROTTLED_NS, StallSplit
from ..core.kvm_abi import vm_fd, vm_gen, vm_label

__all__ = ["migration_dicts", "migration_lines", "STOP_SYNC_NOTE", "stall_split_dicts",
           "stall_split_lines"]

STOP_SYNC_NOTE = ("A sync that collects nothing does not reset the rings and is not "
                  "shown: QEMU's dirty-sync-count can be higher by its first sync (right "
                  "after logging starts) and its stop-and-copy sync (when the vCPUs "
                  "dirtied nothing after the last live one).")


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 3)


def _iteration(it: Iteration) -> dict[str, Any]:
    return {"number": it.number, "ts": it.ts, "start_ns": it.start_ns,
            "duration_ns": it.duration_ns, "collected": it.collected,
            "harvested": it.harvested, "pages": it.pages,
            "dirty_rate_mbps": _num(it.dirty_rate_mbps), "sent_pages": it.sent_pages,
            "transfer_rate_mbps": _num(it.transfer_rate_mbps), "converging": it.converging,
            "other_resets": dict(it.other_resets),
            "rings": [{"index": r.ring, "harvested": r.harvested, "pages": r.pages,
                       "pushes": r.pushes, "soft_full_exits": r.soft_full_exits,
                       "stall_ns": r.stall_ns} for r in it.rings]}


def stall_split_dicts(splits: list[StallSplit]) -> list[dict[str, Any]]:
    """The ``stall_split`` list of ``replay --json``: per vCPU ring, its soft-full stalls
    split at the thread's own reset (:mod:`kvmtrace.analysis.throttle`)."""
    return [{"pid": s.pid, "vm": vm_fd(s.vm), "vm_gen": vm_gen(s.vm), "index": s.ring,
             "stalls": s.stalls, "stall_ns": s.stall_ns, "harvest_ns": s.harvest_ns,
             "after_reset_ns": s.after_reset_ns, "throttled": s.throttled,
             "unsplit": s.unsplit, "unsplit_ns": s.unsplit_ns} for s in splits]


def stall_split_lines(splits: list[StallSplit], width: int = 80) -> list[str]:
    """Text: only when some stall was throttled (a dirty limit slept the vCPU)."""
    if not any(s.throttled for s in splits):
        return []
    out = ["", "soft-full stalls: harvest vs after the reset (a dirty limit's throttle)",
           f"{'ring':>4} {'pid':>7} {'vm':>3} {'stalls':>7} {'stall':>9} {'harvest':>9} "
           f"{'throttle':>9} {'throttled':>9} {'unsplit':>7}"]
    for s in splits:
        vm = vm_label(s.vm) if s.vm != -1 else "?"
        out.append(f"{s.ring:>4} {s.pid:>7} {vm:>3} {s.stalls:>7} {s.stall_ns / 1e6:>7.1f}ms "
                   f"{s.harvest_ns / 1e6:>7.1f}ms {s.after_reset_ns / 1e6:>7.1f}ms "
                   f"{s.throttled:>9} {s.unsplit:>7}")
    out += textwrap.wrap(
        "harvest: soft-full exit to the end of the vCPU thread's own KVM_RESET_DIRTY_RINGS; "
        "throttle: from there to the next KVM_RUN (QEMU's dirty-limit sleep; microseconds "
        f"without one); throttled: stalls with {THROTTLED_NS // 1_000_000} ms or more of it; "
        "unsplit: stalls without a reset of their own thread.", width)
    return out


def migration_dicts(migrations: list[Migration]) -> list[dict[str, Any]]:
    """The ``migrations`` list of ``replay --json``."""
    return [{"pid": m.pid, "vm": vm_fd(m.vm), "vm_gen": vm_gen(m.vm), "tid": m.tid,
             "vcpu_tids": list(m.vcpu_tids), "reaper_tids": list(m.reaper_tids),
             "syncs": len(m.iterations), "stopped": m.stopped, "verdict": m.verdict,
             "iterations": [_iteration(it) for it in m.iterations]} for m in migrations]


def _f(x: float | None, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.1f}"


def _dur(ns: int) -> str:
    return f"{ns / 1e6:.0f}ms" if ns < 10**10 else f"{ns / 1e9:.1f}s"


def migration_lines(migrations: list[Migration], start_ns: int | None,
                    width: int = 80) -> list[str]:
    """The text section (lines of at most ``width`` columns; none without a migration)."""
    out: list[str] = []
    for m in migrations:
        vm = vm_label(m.vm) if m.vm != -1 else "?"
        reaper = ",".join(map(str, m.reaper_tids)) or "-"
        out += ["", f"dirty-log syncs (migration iterations) of pid {m.pid} vm {vm}",
                *textwrap.wrap(f"{len(m.iterations)} syncs by thread {m.tid}; reaper "
                               f"thread {reaper}; vCPU threads "
                               f"{', '.join(map(str, m.vcpu_tids))}", width,
                               initial_indent="  ", subsequent_indent="  "),
                f"  {m.verdict}",
                f"{'sync':>4} {'at(s)':>7} {'window':>7} {'harvest':>8} {'pages':>7} "
                f"{'dirty':>7} {'sent':>7} {'conv':>4} {'vcpu/reap':>9}  pages/vCPU",
                f"{'':>4} {'':>7} {'':>7} {'entries':>8} {'':>7} {'MB/s':>7} {'MB/s':>7}"]
        t0 = start_ns if start_ns is not None else (m.iterations[0].start_ns
                                                    if m.iterations else 0)
        for it in m.iterations:
            conv = "-" if it.converging is None else ("yes" if it.converging else "no")
            resets = f"{it.other_resets.get('vcpu', 0)}/{it.other_resets.get('reaper', 0)}"
            per = " ".join(str(r.pages) for r in it.rings)
            out.append(f"{it.number:>4} {(it.ts - t0) / 1e9:>7.3f} {_dur(it.duration_ns):>7} "
                       f"{it.harvested:>8} {it.pages:>7} {_f(it.dirty_rate_mbps, 7)} "
                       f"{_f(it.transfer_rate_mbps, 7)} {conv:>4} {resets:>9}  {per}")
        out += textwrap.wrap(
            "sync: a KVM_RESET_DIRTY_RINGS of every ring by a thread that is not a vCPU "
            "and was started after them (QEMU's migration thread, one per "
            "migration_bitmap_sync); window: since the previous sync; harvest: entries "
            "collected in it by any thread; pages: distinct pages among them; sent: the "
            "previous window's pages over this window (QEMU sends them in it), from sync "
            "3 on; conv: fewer pages dirtied than sent; vcpu/reap: resets by vCPU threads "
            "(soft-full) and the reaper in the window. " + STOP_SYNC_NOTE, width)
    return out
