"""``compare --html`` without a kernel: the stored recording of a real built-in VMM run
(tests/data/recordings, with the VMM's own ``--json`` beside it) gives the ground truth.

The series' bins add up to the VMM's counts at any bin width; a side of two traces (a
bundle) adds up both; the HTML names no URL, and each image's ``width``/``height`` are its
PNG's; a bad ``--html`` is one line and exit 2 before anything is read; ``compare``
without ``--html`` does not import matplotlib. The browser check is in
tests/test_report_html_kvm.py."""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import subprocess
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import ROOT, kvmtrace_cmd

from kvmtrace.analysis.ringseries import FIRST_WIDTH_NS, run_series, side_series
from kvmtrace.source.detect import open_source
from kvmtrace.views.report_html import render_html, report_paths

REC = ROOT / "tests" / "data" / "recordings" / "workload-2vcpu-4096B-400pages-v1.0.kvt"
TRUTH = json.loads(REC.with_suffix(".json").read_text())


@pytest.mark.parametrize("max_bins", [2048, 8, 1])
def test_series_add_up_to_the_vmm_counts(max_bins: int) -> None:
    run = run_series(open_source(REC), path=str(REC), max_bins=max_bins)
    assert sorted(run.rings) == [r["index"] for r in TRUTH["rings"]]
    # the width doubled until the span fits the bins
    k = (run.width_ns // FIRST_WIDTH_NS).bit_length() - 1
    assert run.width_ns == FIRST_WIDTH_NS << k
    assert run.span_ns // run.width_ns < max_bins
    assert k == 0 or run.span_ns // (run.width_ns // 2) >= max_bins
    for r in TRUTH["rings"]:
        rs = run.rings[r["index"]]
        assert len({len(rs.pushes), len(rs.max_used), len(rs.resets),
                    len(rs.entries_reset)}) == 1
        assert int(rs.pushes.sum()) == r["pages_written"]
        assert int(rs.entries_reset.sum()) == r["entries_reset"]
        assert int(rs.resets.sum()) == TRUTH["resets"]  # every ioctl visits every ring
        assert int(rs.max_used.max()) == TRUTH["soft_limit"]
        assert len(run.stalls(r["index"])) == r["soft_full_exits"]
    assert run.reset_lat_ns.seen == TRUTH["resets"]


class _Doc(HTMLParser):
    """img attributes, and the numbers table as {(side, ring): {column: text}}."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.head: list[str] = []
        self.rows: dict[tuple[str, str], list[str]] = {}
        self._row: tuple[str, str] | None = None
        self._cell: list[str] | None = None
        self._in_numbers = self._in_th = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.imgs.append(a)
        elif tag == "table":
            self._in_numbers = a.get("id") == "numbers"
        elif tag == "tr" and self._in_numbers and "data-side" in a:
            self._row = (a["data-side"], a["data-ring"])
            self.rows[self._row] = []
        elif tag in ("td", "th") and self._in_numbers:
            self._cell, self._in_th = [], tag == "th"

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell)
            if self._in_th:
                self.head.append(text)
            elif self._row is not None:
                self.rows[self._row].append(text)
            self._cell = None
        elif tag == "table":
            self._in_numbers = False

    def table(self) -> dict[tuple[str, str], dict[str, str]]:
        return {k: dict(zip(self.head, v, strict=True)) for k, v in self.rows.items()}


def parse(text: str) -> _Doc:
    doc = _Doc()
    doc.feed(text)
    return doc


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def test_bundle_sides_pool_their_traces(tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    report_paths(out, [REC, REC], [REC])
    assert out.stat().st_mode & 0o777 == 0o600
    text = out.read_text()
    assert re.findall(r"https?:|//[\w.-]+\.\w+/|url\(|@import|<script|<link", text) == []
    doc = parse(text)
    assert [i["id"] for i in doc.imgs] == ["plot-stall", "plot-reset-latency", "plot-rings"]
    for img in doc.imgs:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        w, h = png_size(base64.b64decode(src.split(",", 1)[1]))
        assert (int(img["width"]), int(img["height"])) == (w, h)
    table = doc.table()
    assert doc.head[:2] == ["side", "ring"]
    for side, n in (("base", 2), ("new", 1)):
        for r in TRUTH["rings"]:
            row = table[side, str(r["index"])]
            assert int(row["pushes"]) == n * r["pages_written"]
            assert int(row["entries reset"]) == n * r["entries_reset"]
            assert int(row["stalls"]) == n * r["soft_full_exits"]
        assert int(table[side, "all"]["reset ioctls"]) == n * TRUTH["resets"]
        assert int(table[side, "all"]["pushes"]) == n * TRUTH["pages"] * TRUTH["vcpus"]


def test_verdict_text_is_escaped() -> None:
    runs = side_series([REC])
    text = render_html(runs, runs, verdicts="a <b> & c")
    assert "<pre id='verdicts'>a &lt;b&gt; &amp; c</pre>" in text


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd(*args), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("target", ["input", "dir", "missing-dir"])
def test_bad_html_path_is_one_line_before_reading(tmp_path: Path, target: str) -> None:
    other = tmp_path / "copy.kvt"
    other.write_bytes(REC.read_bytes())
    out = {"input": str(other), "dir": str(tmp_path),
           "missing-dir": str(tmp_path / "no" / "r.html")}[target]
    p = run_cli("compare", str(REC), str(other), "--html", out)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith("kvmtrace compare: error: --html ")
    assert other.read_bytes() == REC.read_bytes()


def test_compare_without_html_does_not_import_matplotlib() -> None:
    python, *rest = kvmtrace_cmd("compare", str(REC), str(REC))
    p = subprocess.run([python, "-X", "importtime", *rest], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines()}
    assert "kvmtrace.analysis.comparison" in imported  # the comparison ran
    assert not {m for m in imported if m.startswith("matplotlib")}


SAMPLES = ROOT / "tests" / "data" / "samples"
_LINE = re.compile(r"\s(\d+)\.(\d{6}):\s+(?:kvm:)?kvm_dirty_ring_(exit|push): (?:vcpu|ring) (\d+)")


def exit_to_push_ns(text: str) -> dict[int, list[int]]:
    """Per ring index, each soft-full exit to that ring's next push, in ns, read from the
    kernel's own text (timestamps in us): the stalls a text trace gives."""
    out: dict[int, list[int]] = {}
    waiting: dict[int, list[int]] = {}
    for m in _LINE.finditer(text):
        ts = (int(m.group(1)) * 1_000_000 + int(m.group(2))) * 1000
        ring = int(m.group(4))
        if m.group(3) == "exit":
            waiting.setdefault(ring, []).append(ts)
        else:
            out.setdefault(ring, []).extend(ts - t for t in waiting.pop(ring, []))
    return out


def test_text_traces_draw_their_exit_to_push_stalls(tmp_path: Path) -> None:
    ftrace = SAMPLES / "ftrace-1vcpu-8192B-800pages.txt"
    perf = SAMPLES / "perf-script-3vcpu-4096B-400pages.txt"
    out = tmp_path / "t.html"
    p = run_cli("compare", str(ftrace), str(perf), "--ring-bytes", "4096", "--html", str(out))
    assert p.returncode in (0, 1) and p.stderr == "", p.stderr
    doc = parse(out.read_text())
    assert "timed as soft-full exit -> next push" in doc.imgs[0]["alt"]
    table = doc.table()
    # the samples' README: 800 pushes of ring 0 and 2 resets; 400 pushes per ring of 3
    assert int(table["base", "0"]["pushes"]) == 800
    assert int(table["base", "0"]["resets"]) == 2
    assert int(table["base", "0"]["entries reset"]) == 800
    assert [int(table["new", str(i)]["pushes"]) for i in range(3)] == [400, 400, 400]
    for side, path in (("base", ftrace), ("new", perf)):
        truth = exit_to_push_ns(path.read_text())
        every = sorted(v for vals in truth.values() for v in vals)
        assert every  # each sample has soft-full exits
        row = table[side, "all"]
        assert int(row["stalls"]) == len(every)
        for label, q in (("p50", "0.5"), ("p90", "0.9"), ("p99", "0.99")):
            # the smallest value with at least q of all at or below it
            k = max(math.ceil(Fraction(q) * len(every)), 1)
            assert int(row[f"stall {label} ns"]) == every[k - 1]
