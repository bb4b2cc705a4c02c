#!/usr/bin/env python3
"""Benchmark of ``compare --html``: what the report adds to a comparison, as ratios.

    .venv/bin/python tools/bench_report.py [--events N] [--rounds R]

Two synthetic recordings of N events each (:func:`kvmtrace.testing.synth.workload_stream`,
4 vCPUs, seq and random) are written once; then, per round and side by side:
  profile   compare's own pass over one recording (analysis.profile.profile_source), the
            anchor every ratio is against;
  series    the report's pass (analysis.ringseries.run_series);
  render    drawing the report of the two (matplotlib Agg, PNG, HTML), with matplotlib
            already imported (the first import is reported apart).
Best of R rounds; the machine may be shared: the ratios are what to read.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import Column, Table, parser

from kvmtrace.analysis.profile import profile_source
from kvmtrace.analysis.ringseries import run_series
from kvmtrace.core.sources import SourceMeta
from kvmtrace.source.detect import open_source
from kvmtrace.source.recording import RecordingWriter
from kvmtrace.testing.synth import workload_stream
from kvmtrace.views.report_html import render_html


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = parser(__doc__, rounds=3)
    ap.add_argument("--events", type=int, default=2_000_000, help="events per recording")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for pattern in ("seq", "random"):
            p = Path(tmp) / f"{pattern}.kvt"
            with RecordingWriter(p, SourceMeta(kind="bench")) as w:
                w.write(workload_stream(args.events, vcpus=4, pattern=pattern))
            paths.append(p)
        t0 = time.perf_counter()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

        print(f"import matplotlib: {time.perf_counter() - t0:.2f} s (once per report)")
        best = {"profile": float("inf"), "series": float("inf"), "render": float("inf")}
        runs = []
        for _ in range(args.rounds):
            for p in paths:
                best["profile"] = min(best["profile"],
                                      timed(lambda p=p: profile_source(open_source(p))))
                best["series"] = min(best["series"],
                                     timed(lambda p=p: runs.append(run_series(open_source(p)))))
            pair = runs[-2:]
            best["render"] = min(best["render"],
                                 timed(lambda pair=pair: render_html(pair[:1], pair[1:])))
        table = Table([Column("step", "<8"), Column("best s", ">8", ">8.3f"),
                       Column("events/s", ">12"), Column("x profile", ">10", ">10.2f")])
        print(f"{args.events:,} events per recording, best of {args.rounds} rounds "
              "(profile, series: one recording; render: the report of both, which does not "
              "grow with events)")
        print(table.header())
        for step, secs in best.items():
            rate = f"{args.events / secs:,.0f}" if step != "render" else "-"
            print(table.row(step, secs, rate, secs / best["profile"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
