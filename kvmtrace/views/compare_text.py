"""80-column text of a :class:`~kvmtrace.analysis.comparison.Comparison`, like ``perf diff``.

One header block naming both traces (source kind, span, events, how stalls were timed),
then one line per metric and ring row: ring, metric, base, new, change in percent and a
verdict marker (``REGRESSION``, ``improved``, ``~noise`` when the change passes the
threshold but the bootstrap finds it within noise, blank otherwise), then a summary line.
"""

from __future__ import annotations

import math

from ..analysis.comparison import Comparison, MetricRow, Verdict
from ..analysis.profile import ALL, Profile

__all__ = ["render_text", "format_value"]

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


def _mark(row: MetricRow, threshold_pct: float) -> str:
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
            change=_change(row), mark=_mark(row, cmp.threshold_pct)).rstrip())
    lines.append("")
    n_reg, n_imp = len(cmp.regressions), len(cmp.improvements)
    if n_reg:
        worst = ", ".join(sorted({f"{r.name} ({r.ring})" for r in cmp.regressions
                                  if r.ring == ALL} or {r.name for r in cmp.regressions}))
        summary = f"{n_reg} regression(s): {worst}"
    else:
        summary = "no regression"
    if n_imp:
        summary += f"; {n_imp} improvement(s)"
    lines.append(summary if len(summary) <= WIDTH else summary[:WIDTH - 3] + "...")
    return "\n".join(lines)
