"""``kvmtrace compare --html FILE``: a self-contained HTML report of two sides.

One HTML file that needs nothing but a browser: no script, no style sheet, font or image
fetched from anywhere; every plot is a PNG drawn with matplotlib's Agg backend and embedded
as a ``data:image/png;base64`` URI (written without matplotlib's "Software" text chunk, so
the file names no URL at all). matplotlib is imported only when a report is drawn.

Each side (``base``, ``new``) is a list of :class:`~kvmtrace.analysis.ringseries.RunSeries`:
one trace, or the repetitions of a benchmark bundle. The report holds, in order:

- the inputs of each side (path, source kind, events, span, lost events) and the verdict
  summary line;
- ``stall``: the stall time distribution (exit 31 to the vCPU's next KVM_RUN, ns), every
  value of every trace of a side pooled: a histogram on log-spaced bins (share of the side's
  stalls per bin) and the exact ECDF, both on a log time axis, the legend giving count and
  exact p50/p90/p99;
- ``reset-latency``: the same for KVM_RESET_DIRTY_RINGS ioctl durations;
- ``rings``: per ring index (at most :data:`MAX_RING_ROWS`), over seconds from each trace's
  first event, on at most :data:`DISPLAY_BINS` bins (the analysis' bins merged): push rate
  (pushes per second), ring fill (mean ``dirty_index - reset_index`` at the bin's pushes,
  and its maximum dotted) and entries per reset (entries the bin's resets collected / its
  resets); one line per trace, the side's colour;
- the verdict table of ``kvmtrace compare`` as text (:mod:`.compare_text`);
- the numbers behind the plots, per side and ring (``table#numbers``, one ``tr`` per side
  and ring with ``data-side`` and ``data-ring``): pushes, resets, entries reset, max used,
  stalls and their exact percentiles, reset ioctls and theirs.

Every ``img`` carries ``width``/``height`` equal to its PNG's pixel size, an ``id``
(``plot-stall``, ``plot-reset-latency``, ``plot-rings``) and an ``alt`` text.
"""

from __future__ import annotations

import base64
import datetime
import html
import importlib.util
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import __version__
from ..analysis.distribution import percentiles
from ..analysis.profile import ALL
from ..analysis.ringseries import RunSeries, side_series
from ..errors import MissingFeature
from ..host.outfile import atomic_output, check_output
from .compare_text import format_value

__all__ = ["BASE_COLOR", "NEW_COLOR", "MAX_RING_ROWS", "DPI", "DISPLAY_BINS", "Plot", "plots",
           "check_report", "render_html", "report_paths", "write_html"]

BASE_COLOR = "#1f5fbf"  #: every base line and bar
NEW_COLOR = "#d6401a"  #: every new (candidate) line and bar
MAX_RING_ROWS = 8  #: ring indices drawn in the time series (the lowest ones)
DPI = 100
DISPLAY_BINS = 240  #: points per time series drawn (the analysis' bins merged to fit)
_QS = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
_SIDES = (("base", BASE_COLOR), ("new", NEW_COLOR))


@dataclass(frozen=True)
class Plot:
    """One embedded image: its id, a caption, the PNG and its size in pixels."""

    id: str
    caption: str
    png: bytes
    width: int
    height: int


def _pool(runs: Sequence[RunSeries], what: str) -> np.ndarray:
    parts = [r.stalls(ALL) if what == "stall" else r.reset_lat_ns.values for r in runs]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _sampled(run: RunSeries, what: str) -> bool:
    res = run.stall_ns.get(ALL) if what == "stall" else run.reset_lat_ns
    return res is not None and res.sampled


def _legend(label: str, values: np.ndarray) -> str:
    if len(values) == 0:
        return f"{label}: none"
    ps = percentiles(values, [q for _, q in _QS]) or []
    text = ", ".join(f"{n} {format_value(v, 'ns')}" for (n, _), v in zip(_QS, ps, strict=True))
    return f"{label}: n={len(values)}, {text}"


def _png(fig: Any) -> Plot:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    w, h = fig.canvas.get_width_height()
    return Plot("", "", buf.getvalue(), w, h)


def _distribution(plt: Any, what: str, title: str, sides: dict[str, np.ndarray]) -> Plot:
    fig, (hist, ecdf) = plt.subplots(1, 2, figsize=(11, 3.6))
    vals = [np.maximum(v, 1) for v in sides.values() if len(v)]
    lo = min((int(v.min()) for v in vals), default=1)
    hi = max((int(v.max()) for v in vals), default=2)
    bins = np.geomspace(lo, max(hi, lo + 1) * 1.001, 50)
    for (label, color), v in zip(_SIDES, sides.values(), strict=True):
        name = _legend(label, v)
        if len(v) == 0:
            hist.plot([], [], color=color, label=name)
            ecdf.plot([], [], color=color, label=name)
            continue
        weights = np.full(len(v), 1.0 / len(v))
        hist.hist(np.maximum(v, 1), bins=bins, weights=weights, histtype="step",
                  color=color, linewidth=1.6, label=name)
        x, n = np.unique(v, return_counts=True)
        y = np.cumsum(n) / len(v)
        ecdf.step(np.concatenate(([x[0]], x)).clip(min=1), np.concatenate(([0.0], y)),
                  where="post", color=color, linewidth=1.6, label=name)
    for ax in (hist, ecdf):
        ax.set_xscale("log")
        ax.set_xlabel(f"{what} (ns, log scale)")
        ax.grid(True, which="major", alpha=0.3)
    hist.set_ylabel("share of the side's values")
    hist.set_title(f"{title}: histogram")
    ecdf.set_ylabel("fraction at or below")
    ecdf.set_ylim(0, 1.02)
    ecdf.set_title(f"{title}: ECDF (every value)")
    if not vals:
        for ax in (hist, ecdf):
            ax.text(0.5, 0.5, f"no {what} events in either side", ha="center",
                    transform=ax.transAxes)
    ecdf.legend(loc="lower right", fontsize=8)
    hist.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    plot = _png(fig)
    plt.close(fig)
    return plot


def _ring_keys(base: Sequence[RunSeries], new: Sequence[RunSeries]) -> list[int]:
    return sorted({k for r in (*base, *new) for k in r.rings})


def _rings(plt: Any, base: Sequence[RunSeries], new: Sequence[RunSeries]) -> Plot:
    keys = _ring_keys(base, new)[:MAX_RING_ROWS]
    rows = max(len(keys), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(12, 2.3 * rows + 0.6), squeeze=False)
    titles = ("push rate (pushes/s)", "ring fill at push: mean, max dotted (entries)",
              "entries per reset")
    for row, key in enumerate(keys):
        for (label, color), runs in zip(_SIDES, (base, new), strict=True):
            for n, run in enumerate(runs):
                rs = run.rings.get(key)
                if rs is None:
                    continue
                factor = max(1, -(-len(rs.pushes) // DISPLAY_BINS))
                rs, width_s = rs.merged(factor), run.width_ns * factor / 1e9
                t = np.arange(len(rs.pushes)) * width_s
                name = label if n == 0 else None
                axes[row][0].step(t, rs.pushes / width_s, where="post", color=color,
                                  linewidth=1.5, label=name)
                pushed = rs.pushes > 0
                mean = np.full(len(t), np.nan)
                mean[pushed] = rs.used_sum[pushed] / rs.pushes[pushed]
                axes[row][1].step(t, mean, where="post", color=color, linewidth=1.5,
                                  label=name)
                axes[row][1].step(t, np.where(rs.max_used >= 0, rs.max_used, np.nan),
                                  where="post", color=color, linewidth=0.8, linestyle=":")
                has = rs.resets > 0
                axes[row][2].plot(t[has], rs.entries_reset[has] / rs.resets[has], "o",
                                  color=color, markersize=3, label=name)
        for col, ax in enumerate(axes[row]):
            ax.set_title(f"ring {key}: {titles[col]}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=8)
            if row == len(keys) - 1:
                ax.set_xlabel("s from the trace's first event", fontsize=8)
        axes[row][0].legend(loc="upper right", fontsize=8)
    if not keys:
        axes[0][1].text(0.5, 0.5, "no ring events in either side", ha="center",
                        transform=axes[0][1].transAxes)
    fig.tight_layout()
    plot = _png(fig)
    plt.close(fig)
    return plot


def plots(base: Sequence[RunSeries], new: Sequence[RunSeries]) -> list[Plot]:
    """The report's images (matplotlib imported here, Agg backend, nothing shown)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = []
    for what, title, pid in (("stall", "stall time", "plot-stall"),
                             ("reset latency", "reset latency", "plot-reset-latency")):
        key = "stall" if what == "stall" else "reset"
        p = _distribution(plt, what, title, {"base": _pool(base, key), "new": _pool(new, key)})
        caption = f"{title}: every value of each side's traces, log time axis"
        if key == "stall":
            timed = sorted({r.stall_source for r in (*base, *new) if r.stall_source})
            caption += "; timed as " + (" and ".join(timed) or "nothing (no stalls)")
        if any(_sampled(r, key) for r in (*base, *new)):
            caption += "; some traces held more values than kept: a uniform sample of them"
        out.append(Plot(pid, caption, p.png, p.width, p.height))
    p = _rings(plt, base, new)
    n = len(_ring_keys(base, new))
    shown = f"rings {min(n, MAX_RING_ROWS)} of {n}" if n > MAX_RING_ROWS else "every ring"
    out.append(Plot("plot-rings", f"per ring index over time ({shown}); one line per trace",
                    p.png, p.width, p.height))
    return out


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#111;max-width:1240px}
pre{background:#f6f6f6;padding:.8em;font-size:12px;overflow-x:auto}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}figure{margin:1em 0}
figcaption{font-size:12px;color:#444}"""
_CSS += f".base{{color:{BASE_COLOR}}}.new{{color:{NEW_COLOR}}}"


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _inputs(base: Sequence[RunSeries], new: Sequence[RunSeries]) -> list[str]:
    out = ["<table id='inputs'><tr><th class='l'>side</th><th class='l'>trace</th>"
           "<th>source</th><th>events</th><th>span</th><th>lost events</th>"
           "<th class='l'>stalls timed as</th></tr>"]
    for (label, _), runs in zip(_SIDES, (base, new), strict=True):
        for r in runs:
            note = " (ends early)" if r.truncated else ""
            out.append(f"<tr><td class='l {label}'>{label}</td><td class='l'>{_e(r.path)}"
                       f"{note}</td><td>{_e(r.kind)}</td><td>{r.events}</td>"
                       f"<td>{_e(format_value(r.span_ns, 'ns'))}</td>"
                       f"<td>{r.lost_events}</td>"
                       f"<td class='l'>{_e(r.stall_source or '-')}</td></tr>")
    out.append("</table>")
    return out


def _pcts(values: np.ndarray) -> list[str]:
    ps = percentiles(values, [q for _, q in _QS]) if len(values) else None
    return [str(v) for v in ps] if ps else ["-"] * len(_QS)


def _numbers(base: Sequence[RunSeries], new: Sequence[RunSeries]) -> list[str]:
    head = ("pushes", "resets", "entries reset", "max used", "stalls", "stall p50 ns",
            "stall p90 ns", "stall p99 ns", "reset ioctls", "reset p50 ns", "reset p90 ns",
            "reset p99 ns")
    out = ["<table id='numbers'><tr><th class='l'>side</th><th class='l'>ring</th>"
           + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for (label, _), runs in zip(_SIDES, (base, new), strict=True):
        for key in (*_ring_keys(base, new), ALL):
            rings = [r.rings[key] for r in runs if key in r.rings] if key != ALL else [
                rs for r in runs for rs in r.rings.values()]
            stalls = [r.stalls(key) for r in runs]
            st = np.concatenate(stalls) if stalls else np.zeros(0, np.int64)
            cells = [sum(int(rs.pushes.sum()) for rs in rings),
                     sum(int(rs.resets.sum()) for rs in rings),
                     sum(int(rs.entries_reset.sum()) for rs in rings),
                     max((int(rs.max_used.max()) for rs in rings if len(rs.max_used)),
                         default=0),
                     len(st), *_pcts(st)]
            if key == ALL:
                lat = _pool(runs, "reset")
                cells += [len(lat), *_pcts(lat)]
            else:
                cells += ["-"] * (1 + len(_QS))
            out.append(f"<tr data-side='{label}' data-ring='{key}'><td class='l {label}'>"
                       f"{label}</td><td class='l'>{key}</td>"
                       + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return out


def render_html(base: Sequence[RunSeries], new: Sequence[RunSeries], *,
                verdicts: str = "", title: str = "kvmtrace compare") -> str:
    """The whole report as one HTML document (str). ``verdicts``: the compare table text."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>",
             f"<p>kvmtrace {_e(__version__)}, made {now}. "
             f"<span class='base'>base</span> against <span class='new'>new</span>: "
             f"{len(base)} and {len(new)} trace(s).</p>",
             "<h2>Inputs</h2>", *_inputs(base, new)]
    summary = verdicts.rstrip().rsplit("\n", 1)[-1] if verdicts else ""
    if summary:
        parts.append(f"<p id='summary'><b>{_e(summary)}</b> (verdict table below)</p>")
    parts.append("<h2>Distributions and rings</h2>")
    for p in plots(base, new):
        data = base64.b64encode(p.png).decode("ascii")
        parts.append(f"<figure><img id='{p.id}' width='{p.width}' height='{p.height}' "
                     f"alt='{_e(p.caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{_e(p.caption)}</figcaption></figure>")
    if verdicts:
        parts += ["<h2>Verdicts</h2>", f"<pre id='verdicts'>{_e(verdicts)}</pre>"]
    parts += ["<h2>Numbers behind the plots</h2>",
              "<p>Exact values from the events (percentiles are values that occurred); "
              "stall and reset columns in ns.</p>", *_numbers(base, new),
              "</body></html>", ""]
    return "\n".join(parts)


def check_report(path: str | os.PathLike[str],
                 inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Refuse, before any trace is read, a report that cannot be written: an output path
    :func:`~kvmtrace.host.outfile.check_output` refuses (``--html`` naming an input, a
    directory, a symlink) or no matplotlib (MissingFeature, one line)."""
    check_output(path, list(inputs), flag="--html")
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingFeature("--html needs matplotlib, which is not installed",
                             "pip install 'kvmtrace[report]' (tools/setup.sh installs it)")


def report_paths(path: str | os.PathLike[str], base: Sequence[str | os.PathLike[str]],
                 new: Sequence[str | os.PathLike[str]], *, verdicts: str = "",
                 ring_entries: int | None = None, ring_bytes: int | None = None,
                 skip_damaged: bool = False) -> None:
    """Read each side's traces (a single trace is a list of one, a bundle its repetitions)
    and write the report to ``path``; ``verdicts``: compare's table as text."""
    b = side_series(base, ring_entries=ring_entries, ring_bytes=ring_bytes,
                    skip_damaged=skip_damaged)
    n = side_series(new, ring_entries=ring_entries, ring_bytes=ring_bytes,
                    skip_damaged=skip_damaged)
    write_html(path, render_html(b, n, verdicts=verdicts), inputs=[*base, *new])


def write_html(path: str | os.PathLike[str], text: str, *,
               inputs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Write the report atomically (0600), never over one of ``inputs``."""
    with atomic_output(path, inputs=list(inputs), flag="--html", text=True) as out:
        out.file.write(text)
