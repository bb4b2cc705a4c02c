"""Text report of ``kvmtrace replay``: at most 80 columns, one section per concern.

Sections: header (source, events, lost events, span; a line per VM: its name and VMM kind),
per-ring counters (``struct kvm_dirty_ring`` of each vCPU: size and where it came from,
pushes, resets, entries reset, soft-full exits, max used), per-ring stalls and harvest
digest, lost pages (overwritten and stranded entries, deduplicated by page with how
many entries each lost, stuck rings), anomalies (time from the first event, ring, indices,
one sentence each), dirty rate and working set per vCPU (push/s and MB/s in QEMU's
terms: entries pushed per second x 4096 / 2**20) and per VM, hottest pages per VM and the
``--simulate-ring-entries`` comparison; with ``histograms``, log2 histograms of stall time
(all rings) and of ``KVM_RESET_DIRTY_RINGS`` latency (:mod:`.histogram`).
Times: ms/us from the trace's ns. Stall percentiles are exact: durations that occurred
(:meth:`~kvmtrace.model.results.Durations.quantile_ns`), never log2 bucket bounds.
"""

from __future__ import annotations

import textwrap

from ..analysis.migration import Migration
from ..analysis.rates import dirty_rate_mbps, span_rates
from ..analysis.replay import ReplayReport
from ..analysis.throttle import StallSplit
from ..core.kvm_abi import vm_label
from ..model.digest import digest_of
from ..model.results import Durations, RingId
from .histogram import log2_hist_lines
from .replay_json import ring_span
from .replay_migration import migration_lines, stall_split_lines

__all__ = ["render_text", "histogram_lines", "all_stalls", "WIDTH", "MAX_ANOMALIES"]

WIDTH = 80
MAX_ANOMALIES = 40  #: anomalies listed in text (all of them are in --json)


def _ms(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns < 1e6:
        return f"{ns / 1e3:.0f}us"
    return f"{ns / 1e6:.1f}ms" if ns < 1e9 else f"{ns / 1e9:.2f}s"


def _who(key: RingId) -> tuple[str, str]:
    pid, vm = key[0], key[1]
    return (str(pid) if pid else "?"), (vm_label(vm) if vm != -1 else "?")


def _fit(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 1] + "~"


def _header(report: ReplayReport, file: str | None, truncated: bool) -> list[str]:
    start, end = ring_span(report)
    span = "-" if start is None or end is None else _ms(end - start)
    out = [f"kvmtrace replay: {file}" if file else "kvmtrace replay",
           f"source {report.source_kind}, {report.events} events, {report.lost} lost events, "
           f"span {span}",
           f"{len(report.rings)} ring(s); KVM reserve {report.reserved} entries "
           f"(soft limit = size - {report.reserved})"]
    out += _names(report)
    if truncated:
        out.append("warning: the recording ends early (writer killed?); replayed what it holds")
    if report.lost:
        out.append(f"warning: {report.lost} lost events (the tracer dropped them): counts are "
                   "lower bounds")
    return out


def _names(report: ReplayReport) -> list[str]:
    """One line per VM, ``VM pid:vm NAME (vmm, comm)`` as live top labels it (the name,
    else the comm); one line saying so when the trace carries no names."""
    vms = sorted({r.ring[:2] for r in report.rings} | set(report.vms))
    if vms and not report.vms:
        if report.source_kind == "recording":
            return ["VM names: none recorded (a recording older than format 1.2)"]
        return [f"VM names: none ({report.source_kind} text carries no VM names)"]
    out = []
    for pid, vm in vms:
        who = report.vms.get((pid, vm))
        p, v = _who((pid, vm, 0))
        if who is None:
            out.append(f"VM {p}:{v} ?")
            continue
        detail = ", ".join(x for x in (who.vmm, who.comm if who.name else None) if x)
        out.append(f"VM {p}:{v} {who.name or who.comm or '?'}"
                   + (f" ({detail})" if detail else ""))
    return out


def _rings(report: ReplayReport) -> list[str]:
    out = ["", f"{'ring':>4} {'pid':>7} {'vm':>3} {'size':>6} {'(from)':<9}{'pushes':>10} "
               f"{'resets':>7} {'reset ent':>10} {'exits':>6} {'maxuse':>6}"]
    for r in report.rings:
        pid, vm = _who(r.ring)
        size = "?" if r.size is None else str(r.size)
        out.append(_fit(
            f"{r.ring[2]:>4} {pid:>7} {vm:>3} {size:>6} {'(' + r.size_source + ')':<9}"
            f"{r.pushes:>10} {r.resets:>7} {r.entries_reset:>10} {r.soft_full_exits:>6} "
            f"{r.max_used:>6}"))
    out += ["", f"{'ring':>4} {'stalls':>7} {'p50':>8} {'p99':>8} {'max':>8} {'lost push':>9} "
                f"{'overwrit':>8} {'harvested':>10}  digest"]
    for r in report.rings:
        d: Durations = r.stalls if r.stalls.count else r.exit_to_push
        what = "" if r.stalls.count or not d.count else "*"
        dig = digest_of(r.harvested, r.harvest_sum1, r.harvest_sum2)[:8]
        out.append(_fit(
            f"{r.ring[2]:>4} {str(d.count) + what:>7} {_ms(d.quantile_ns(0.5)):>8} "
            f"{_ms(d.quantile_ns(0.99)):>8} {_ms(d.max_ns if d.count else None):>8} "
            f"{r.lost_pushes:>9} {r.overwritten:>8} {r.harvested:>10}  {dig}"))
    if any(not r.stalls.count and r.exit_to_push.count for r in report.rings):
        out.append("* no stall events: time from soft-full exit to the ring's next push")
    if any(r.stalls.sampled or r.exit_to_push.sampled for r in report.rings):
        out.append("p50, p99: of a uniform sample of 1,000,000 stalls where a ring had more")
    return out


LOST_SHOWN = 6  #: lost pages listed per ring in text (all, up to LIST_CAP, in --json)


def _lost(report: ReplayReport) -> list[str]:
    rings = [r for r in report.rings if r.overwritten or r.stranded or r.lost_page_count]
    if not rings:
        return []
    out = ["", "lost pages (overwritten + stranded: no reset collected them), page x entries:",
           f"{'ring':>4} {'overwrit':>8} {'stranded':>8} {'stuck':>5} {'pages':>6}  first"]
    for r in rings:
        line = (f"{r.ring[2]:>4} {r.overwritten:>8} {r.stranded:>8} "
                f"{'yes' if r.stuck else 'no':>5} {r.lost_page_count:>6} ")
        shown = 0
        for s, o, n in r.lost_pages[:LOST_SHOWN]:
            item = f" ({s}, {o:#x}) x{n}"
            if len(line) + len(item) + 6 > WIDTH:
                break
            line += item
            shown += 1
        if r.lost_page_count > shown:
            line += f" +{r.lost_page_count - shown}"
        out.append(_fit(line))
    if any(r.stuck for r in rings):
        out += textwrap.wrap("stuck: reset_index sits on an entry a reset already "
                             "cleared; no harvest or reset collects that ring again",
                             WIDTH)
    return out


def _anomalies(report: ReplayReport) -> list[str]:
    if not report.anomalies:
        return ["", "no anomalies: every ring behaved as the model says"]
    start = ring_span(report)[0] or 0
    out = ["", f"anomalies ({len(report.anomalies)}):"]
    for a in report.anomalies[:MAX_ANOMALIES]:
        pid, vm = _who(a.ring)
        out.append(_fit(
            f"  +{(a.time_ns - start) / 1e9:.6f}s {a.kind.value} ring {a.ring[2]} pid {pid} "
            f"vm {vm} dirty {a.dirty_index:#x} reset {a.reset_index:#x}"))
        out += textwrap.wrap(a.detail, WIDTH, initial_indent="      ",
                             subsequent_indent="      ", break_on_hyphens=False)
    if len(report.anomalies) > MAX_ANOMALIES:
        out.append(f"  ... and {len(report.anomalies) - MAX_ANOMALIES} more (all in --json)")
    return out


def _workingset(report: ReplayReport) -> list[str]:
    if not report.workingset:
        return []
    out = ["", f"dirty rate and working set per vCPU (windows of {_ms(report.window_ns)}):",
           f"{'ring':>4} {'pid':>7} {'vm':>3} {'pushes':>9} {'push/s':>9} {'MB/s':>7} "
           f"{'peak/s':>9} {'ws mean':>8} {'ws max':>7} {'windows':>7}"]
    for key in sorted(report.workingset):
        ws = report.workingset[key]
        pid, vm = _who(key)
        distinct = [w[2] for w in ws.windows]
        rate = ws.rate()
        peak = max((w[1] for w in ws.windows), default=0) * 1e9 / report.window_ns
        mean = f"{sum(distinct) / len(distinct):.0f}" if distinct else "-"
        mbps = dirty_rate_mbps(rate)
        out.append(_fit(
            f"{key[2]:>4} {pid:>7} {vm:>3} {ws.pushes:>9} "
            f"{'-' if rate is None else f'{rate:.0f}':>9} "
            f"{'-' if mbps is None else f'{mbps:.1f}':>7} {peak:>9.0f} {mean:>8} "
            f"{max(distinct, default=0):>7} {len(ws.windows):>7}"))
    _, per_vm = span_rates(report.workingset)
    for (pid_, vm_), v in sorted(per_vm.items()):
        pid, vm = _who((pid_, vm_, 0))
        mbps = v.dirty_rate_mbps
        out.append(_fit(
            f"{'all':>4} {pid:>7} {vm:>3} {v.pushes:>9} "
            f"{'-' if v.push_rate is None else f'{v.push_rate:.0f}':>9} "
            f"{'-' if mbps is None else f'{mbps:.1f}':>7}"))
    out += textwrap.wrap("MB/s: dirty rate as QEMU's calc-dirty-rate counts it, entries "
                         "pushed per second x 4096 / 2^20, over the first to last push; "
                         "all: the VM's rings together", WIDTH)
    return out


def _hottest(report: ReplayReport, top: int) -> list[str]:
    out: list[str] = []
    for (pid, vm), pages in sorted(report.hottest.items()):
        p, v = _who((pid, vm, 0))
        out += ["", f"hottest pages of pid {p} vm {v} (pushes = times re-dirtied + 1):",
                f"{'slot':>8} {'offset':>14} {'pushes':>10}"]
        out += [f"{h.slot:>8} {h.offset:>#14x} {h.pushes:>10}" for h in pages[:top]]
    return out


def _simulation(report: ReplayReport) -> list[str]:
    sim = report.simulation
    if sim is None:
        return []
    actual = {r.ring: r.soft_full_exits for r in report.rings}
    out = ["", f"with a ring of {sim.entries} entries (soft limit {sim.soft_limit}): "
               f"{sim.total_exits} soft-full exits, trace had {sum(actual.values())}",
           f"{'ring':>4} {'pid':>7} {'vm':>3} {'sim exits':>10} {'trace exits':>12} "
           f"{'est. stall':>11}"]
    for key, n in sorted(sim.exits.items()):
        pid, vm = _who(key)
        out.append(f"{key[2]:>4} {pid:>7} {vm:>3} {n:>10} {actual.get(key, 0):>12} "
                   f"{_ms(sim.stall_ns.get(key)):>11}")
    out.append("model:")
    for a in sim.assumptions:
        out += textwrap.wrap(a, WIDTH, initial_indent="  - ", subsequent_indent="    ")
    return out


def all_stalls(report: ReplayReport) -> tuple[Durations, bool]:
    """Every ring's stalls in one :class:`Durations`: the KT_STALL events when any ring has
    them (True), else each ring's soft-full exit -> next push (False)."""
    measured = any(r.stalls.count for r in report.rings)
    out = Durations()
    for r in report.rings:
        out.merge(r.stalls if measured else r.exit_to_push)
    return out, measured


def _summary(d: Durations, title: str, what: str) -> list[str]:
    if not d.count:
        return ["", title, f"  no {what} in this trace"]
    sample = " (percentiles of a uniform sample)" if d.sampled else ""
    return ["", title, f"  {d.count} {what}: p50 {_ms(d.quantile_ns(0.5))}, p99 "
                       f"{_ms(d.quantile_ns(0.99))}, max {_ms(d.max_ns)}{sample}"]


def histogram_lines(report: ReplayReport, reset_latency: Durations | None) -> list[str]:
    """The ``--hist`` section: log2 histograms (ns) of stall time over all rings and of
    KVM_RESET_DIRTY_RINGS latency (``reset_latency``; None: the trace has no such events),
    each under a line with its exact count, p50, p99 and max."""
    stalls, measured = all_stalls(report)
    title = ("stall time, all rings (soft-full exit to the next KVM_RUN):" if measured else
             "stall time, all rings (no stall events: soft-full exit to the next push):")
    out = _summary(stalls, title, "stalls") + log2_hist_lines(stalls.hist, "nsecs", WIDTH)
    rl = reset_latency if reset_latency is not None else Durations()
    out += _summary(rl, "KVM_RESET_DIRTY_RINGS latency, all VMs:", "ioctls")
    return out + log2_hist_lines(rl.hist, "nsecs", WIDTH)


def render_text(report: ReplayReport, *, file: str | None = None, top: int = 10,
                truncated: bool = False, warnings: list[str] | None = None,
                migrations: list[Migration] | None = None,
                stall_splits: list[StallSplit] | None = None,
                histograms: bool = False, reset_latency: Durations | None = None) -> str:
    """The whole text report (lines of at most :data:`WIDTH` columns); ``migrations``:
    :func:`kvmtrace.analysis.migration.find_migrations` of the same trace; ``histograms``:
    end with :func:`histogram_lines` (``reset_latency``: the trace's RESET_LAT values)."""
    lines = (_header(report, file, truncated)
             + [x for w in warnings or []
                for x in textwrap.wrap(f"warning: {w}", WIDTH, subsequent_indent="  ")]
             + _rings(report) + _lost(report) + _anomalies(report)
             + _workingset(report) + _hottest(report, top) + _simulation(report)
             + migration_lines(migrations or [], ring_span(report)[0], WIDTH)
             + stall_split_lines(stall_splits or [], WIDTH)
             + (histogram_lines(report, reset_latency) if histograms else []))
    return "\n".join(_fit(line) for line in lines)
