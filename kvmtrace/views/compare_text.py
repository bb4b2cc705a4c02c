"""80-column text of a :class:`~kvmtrace.analysis.comparison.Comparison`, like ``perf diff``.

One header block naming both traces (source kind, span, events, how stalls were timed),
then one line per metric and ring row: ring, metric, base, new, change in percent and a
verdict marker (``REGRESSION``, ``improved``, ``~noise`` when the change passes the
threshold but the bootstrap finds it within noise, blank otherwise), then the ring
anomalies (overflowed or stuck rings) and a summary line.

:func:`render_reps`: the same for two bundles (:class:`~kvmtrace.analysis.rep_comparison.
RepComparison`): one line per metric with both means over the repetitions, the change of
the mean and its 95 % interval, and the verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..analysis.bundle import Bundle
from ..analysis.comparison import AnomalyRow, Comparison, MetricRow, Verdict
from ..analysis.profile import ALL, Profile
from ..analysis.rep_comparison import CONFIDENCE, JUDGED, RepComparison, RepRow

__all__ = ["render_text", "render_reps", "format_value"]

WIDTH = 80
_LINE = "{ring:>4} {name:<22} {base:>12} {new:>12} {change:>9}  {mark}"


def format_value(value: float | None, unit: str) -> str:
    """A value for a column: ns as ns/us/ms/s, rates with k/M, counts as integers."""
    if value is None:
        return "-"
    if unit == "ns":
        for scale, suffix in ((1e9, "s"), (1e6, "ms"), (1e3, "us")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {suffix}"
        return f"{value:.0f} ns"
    if unit == "MB/s":
        return f"{value:.4g} MB/s"
    if unit == "1/s":
        for scale, suffix in ((1e9, "G/s"), (1e6, "M/s"), (1e3, "k/s")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {suffix}"
        return f"{value:.3g}/s"
    if float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.4g}"


def _change(row: MetricRow) -> str:
    c = row.change_pct
    if c is None:
        return "new" if row.base is None and row.new is not None else (
            "gone" if row.new is None and row.base is not None else "")
    if math.isinf(c):
        return "+inf" if c > 0 else "-inf"
    return f"{c:+.1f}%"


def _mark(row: MetricRow, cmp: Comparison) -> str:
    threshold_pct = cmp.thresholds.pct(row.name)
    if row.verdict == Verdict.REGRESSION:
        return "REGRESSION"
    if row.verdict == Verdict.IMPROVEMENT:
        return "improved"
    if (row.significant is False and row.change_pct is not None
            and abs(row.change_pct) > threshold_pct):
        return "~noise"
    return ""


def _names(p: Profile) -> str:
    """``#   VMs: web01 (qemu pid 4242), ...`` (the name, else the comm, as top labels a
    VM); a trace that carries no names says so."""
    if p.vms and not any(v.name or v.comm for v in p.vms):
        what = "recording older than format 1.2" if p.kind == "recording" else f"{p.kind} text"
        return f"#   VM names: none ({what})"
    parts = [f"{v.name or v.comm or '?'} ({v.vmm or 'VMM'} pid {v.pid or '?'})"
             for v in p.vms]
    line = "#   VMs: " + ", ".join(parts)
    return line if len(line) <= WIDTH else line[: WIDTH - 1] + "~"


def _side(label: str, path: str, p: Profile) -> list[str]:
    head = f"# {label}: "
    room = WIDTH - len(head)
    out = [head + (path if len(path) <= room else "..." + path[-(room - 3):])]
    info = f"#   {p.kind}, {p.events} events over {format_value(p.span_ns, 'ns')}"
    if p.lost_events:
        info += f", {p.lost_events} lost events"
    if p.stall_source:
        info += f"; stalls: {p.stall_source}"
    out.append(info)
    out.append(_names(p))
    if p.sampled:
        out.append("#   sampled: distributions hold a uniform sample of their values")
    return out


def render_text(cmp: Comparison) -> str:
    """The report, every line at most 80 columns."""
    lines = [*_side("base", cmp.base_path, cmp.base), *_side("new ", cmp.new_path, cmp.new)]
    lines.append(f"# verdicts: change beyond {cmp.threshold_pct:g}% and, for percentiles, "
                 "a bootstrap 95% interval")
    lines.append("#   of the difference that excludes zero; ratio = new/base")
    if not cmp.stalls_comparable:
        lines.append("# warning: stalls were timed differently in the two traces: "
                     "no stall verdicts")
    lines.append("#")
    lines.append(_LINE.format(ring="ring", name="metric", base="base", new="new",
                              change="change", mark="verdict").rstrip())
    last: int | str | None = None
    for row in cmp.rows:
        if last is not None and row.ring != last:
            lines.append("")
        last = row.ring
        lines.append(_LINE.format(
            ring=str(row.ring) if row.ring != ALL else ALL, name=row.name[:22],
            base=format_value(row.base, row.unit), new=format_value(row.new, row.unit),
            change=_change(row), mark=_mark(row, cmp)).rstrip())
    lines.append("")
    lines += _anomaly_lines(cmp.anomalies)
    anomalies = [f"ring {a.kind}" for a in cmp.anomaly_regressions]
    n_reg = len(cmp.regressions) + len(anomalies)
    n_imp = len(cmp.improvements) + sum(a.verdict == Verdict.IMPROVEMENT
                                        for a in cmp.anomalies)
    if n_reg:
        worst = ", ".join([*anomalies, *sorted(
            {f"{r.name} ({r.ring})" for r in cmp.regressions if r.ring == ALL}
            or {r.name for r in cmp.regressions})])
        summary = f"{n_reg} regression(s): {worst}"
    else:
        summary = "no regression"
    if n_imp:
        summary += f"; {n_imp} improvement(s)"
    lines.append(_clip(summary))
    return "\n".join(lines)


def _clip(line: str) -> str:
    return line if len(line) <= WIDTH else line[:WIDTH - 3] + "..."


def _anomaly_lines(rows: Sequence[AnomalyRow]) -> list[str]:
    """``anomaly: ring stranded in 0/3 base, 2/3 new runs  REGRESSION`` per kind; a note
    that the stall verdicts are off while there is one."""
    out = []
    for a in rows:
        mark = {Verdict.REGRESSION: "REGRESSION", Verdict.IMPROVEMENT: "improved"}.get(
            a.verdict or "", "in both")
        out.append(_clip(f"anomaly: ring {a.kind} in {a.base_runs}/{a.base_of} base, "
                         f"{a.new_runs}/{a.new_of} new run(s)  {mark}"))
    if rows:
        out += ["#   a ring overflowed or got stuck: stall and reset-latency percentiles",
                "#   get no verdict (a livelock's tiny stalls are not an improvement)", ""]
    return out


_REP_LINE = "{name:<19} {base:>10} {new:>10} {change:>8} {ci:>17}  {mark}"


def _bundle_side(label: str, b: Bundle) -> list[str]:
    head = f"# {label}: "
    path = str(b.path)
    room = WIDTH - len(head)
    out = [head + (path if len(path) <= room else "..." + path[-(room - 3):])]
    m = b.meta
    if m is None:
        out.append(f"#   one trace ({b.reps} run)")
        return out
    kernel = (m.get("kernel") or {}).get("release", "?")
    what = m.get("preset") or " ".join(m.get("workload_args") or []) or "?"
    out.append(_clip(f"#   {b.reps} run(s) of {m.get('vmm', '?')} {what}"))
    out.append(_clip(f"#   kernel {kernel}, {m.get('cpu_model', '?')}, "
                     f"{m.get('created', '?')}"))
    return out


def _num(v: float) -> str:
    return f"{v:+.0f}" if abs(v) >= 1000 else f"{v:+.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else _num(v) + "%"


def _rep_mark(row: RepRow) -> str:
    if row.verdict == Verdict.REGRESSION:
        return "REGRESSION"
    if row.verdict == Verdict.IMPROVEMENT:
        return "improved"
    if row.verdict == Verdict.SAME and row.change_pct is not None \
            and abs(row.change_pct) > row.threshold_pct:
        return "~noise"
    return ""


def render_reps(cmp: RepComparison, base: Bundle, new: Bundle) -> str:
    """The report of two bundles, every line at most 80 columns."""
    lines = [*_bundle_side("base", base), *_bundle_side("new ", new)]
    lines.append(f"# change of the mean over runs; {CONFIDENCE:.1%} Welch t-interval of "
                 "the change")
    lines.append(f"#   (95% for all {JUDGED} verdicts); a verdict needs the whole interval "
                 f"beyond {cmp.thresholds.default_pct:g}%")
    per = ", ".join(f"{k}={v:g}%" for k, v in sorted(cmp.thresholds.per_metric.items()))
    if per:
        lines.append(_clip(f"#   (thresholds: {per})"))
    lines.append("#")
    lines.append(_REP_LINE.format(name="metric", base="base mean", new="new mean",
                                  change="change", ci=f"{CONFIDENCE:.1%} interval",
                                  mark="verdict").rstrip())
    for row in cmp.rows:
        ci = "-" if row.ci_low_pct is None or row.ci_high_pct is None else \
            f"[{_num(row.ci_low_pct)}, {_num(row.ci_high_pct)}]"
        lines.append(_REP_LINE.format(
            name=row.name[:19], base=format_value(row.base_mean, row.unit),
            new=format_value(row.new_mean, row.unit), change=_pct(row.change_pct),
            ci=ci, mark=_rep_mark(row)).rstrip())
    lines.append("")
    lines += _anomaly_lines(cmp.anomalies)
    if cmp.regressions:
        summary = f"{len(cmp.regressions)} regression(s): {', '.join(cmp.regressions)}"
    else:
        summary = "no regression"
    if cmp.improvements:
        summary += f"; {len(cmp.improvements)} improvement(s)"
    lines.append(_clip(summary))
    return "\n".join(lines)
