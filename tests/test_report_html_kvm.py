"""``kvmtrace compare BASE NEW --html FILE`` on real recordings, opened in a real browser.

Two runs of the built-in VMM under ``record``, the second delaying every harvest by 20 ms
(``--harvest-delay-us``). The report is loaded in headless Chromium (DevTools protocol on a
pipe, tests/headless_chromium.py): every plot must have decoded at the size of its PNG, the
page must have fetched nothing, and the full-page screenshot must show, where each plot
sits, exactly the pixels of that plot's PNG (so the browser drew it, not a blank or broken
image), with both sides' colours in it. The numbers behind the plots, read from the
browser's DOM, must equal the VMM's own counts, and the stall percentiles the exact order
statistics of the recorded stall events.
"""

from __future__ import annotations

import base64
import io
import math
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import RecordedRun, kvmtrace_cmd, record_workload, require, require_kvm_bpf
from headless_chromium import Browser, chromium_path

from kvmtrace.core.events import Kind
from kvmtrace.source.detect import open_source
from kvmtrace.views.report_html import BASE_COLOR, NEW_COLOR

WORKLOAD = ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "3000", "--exit-every", "1")
PLOTS = ("plot-stall", "plot-reset-latency", "plot-rings")

_IMGS = """Array.from(document.images).map(i => { const r = i.getBoundingClientRect();
  return {id: i.id, complete: i.complete, natural: [i.naturalWidth, i.naturalHeight],
          attr: [+i.getAttribute('width'), +i.getAttribute('height')],
          x: r.left + window.scrollX, y: r.top + window.scrollY}; })"""
_ROWS = """Array.from(document.querySelectorAll('table#numbers tr[data-side]')).map(tr =>
  [tr.dataset.side, tr.dataset.ring, Array.from(tr.cells).slice(2).map(c => c.textContent)])"""
_HEAD = """Array.from(document.querySelectorAll('table#numbers tr:first-child th')).slice(2)
  .map(th => th.textContent)"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[RecordedRun, RecordedRun, Path]:
    require_kvm_bpf()
    require(chromium_path() is not None,
            "chromium is not installed (tools/setup.sh --test installs it)")
    tmp = tmp_path_factory.mktemp("report")
    base = record_workload(tmp / "base", *WORKLOAD)
    new = record_workload(tmp / "delayed", *WORKLOAD, "--harvest-delay-us", "20000")
    out = tmp / "report.html"
    p = subprocess.run(kvmtrace_cmd("compare", str(base.path), str(new.path), "--html",
                                    str(out)), capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr == "", p.stderr  # the delay is a regression
    assert "REGRESSION" in p.stdout
    return base, new, out


def pngs(text: str) -> dict[str, bytes]:
    """img id -> the PNG its data URI holds."""
    found = re.findall(r"<img id='([\w-]+)'[^>]* src='data:image/png;base64,([^']+)'>", text)
    return {i: base64.b64decode(d) for i, d in found}


def rgb(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def color_pixels(img: np.ndarray, color: str) -> int:
    want = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=img.dtype)
    return int((img == want).all(axis=2).sum())


def exact(values: np.ndarray, q: float) -> int:
    """The q-quantile as an order statistic: the smallest value with at least q of all
    values at or below it."""
    s = np.sort(values)
    return int(s[max(math.ceil(Fraction(str(q)) * len(s)), 1) - 1])


def stall_events(path: Path) -> np.ndarray:
    src = open_source(path)
    ev = np.concatenate(list(src.batches()))
    return ev[ev["kind"] == Kind.STALL]


def test_report_is_self_contained(report: tuple[RecordedRun, RecordedRun, Path]) -> None:
    *_, out = report
    text = out.read_text()
    assert out.stat().st_mode & 0o777 == 0o600
    assert re.findall(r"https?:|ftp:|//[\w.-]+\.\w+/|url\(|@import|<script|<link|<iframe",
                      text) == []
    assert re.findall(r"(?:src|href)=['\"](?!data:image/png;base64,)", text) == []
    assert sorted(pngs(text)) == sorted(PLOTS)


def test_report_opens_in_chromium_with_its_plots(
        report: tuple[RecordedRun, RecordedRun, Path]) -> None:
    base, new, out = report
    images = pngs(out.read_text())
    with Browser() as browser:
        browser.open(out)
        imgs = browser.eval(_IMGS)
        fetched = browser.eval("performance.getEntriesByType('resource').map(e => e.name)")
        head = browser.eval(_HEAD)
        rows = browser.eval(_ROWS)
        verdicts = browser.eval("document.getElementById('verdicts').textContent")
        shot = rgb(browser.screenshot())
    assert fetched == []
    assert [i["id"] for i in imgs] == list(PLOTS)
    for img in imgs:
        png = rgb(images[img["id"]])
        h, w, _ = png.shape
        assert img["complete"] and img["natural"] == img["attr"] == [w, h]
        x, y = round(img["x"]), round(img["y"])
        drawn = shot[y:y + h, x:x + w]
        assert drawn.shape == png.shape and (drawn == png).all(), img["id"]
        # not blank: both sides are drawn, in their colours
        assert color_pixels(drawn, BASE_COLOR) > 0 and color_pixels(drawn, NEW_COLOR) > 0
    assert "regression(s)" in verdicts and "stall p50" in verdicts

    table = {(side, ring): dict(zip(head, cells, strict=True)) for side, ring, cells in rows}
    for side, run in (("base", base), ("new", new)):
        truth = run.truth
        for r in truth["rings"]:
            row = table[side, str(r["index"])]
            assert int(row["pushes"]) == r["pages_written"] == 3000
            assert int(row["resets"]) == r["reset_events"]
            assert int(row["entries reset"]) == r["entries_reset"]
            assert int(row["max used"]) == truth["soft_limit"]
            assert int(row["stalls"]) == r["soft_full_exits"]
        every = table[side, "all"]
        assert int(every["pushes"]) == sum(r["pages_written"] for r in truth["rings"])
        assert int(every["reset ioctls"]) == truth["resets"]
        stalls = stall_events(run.path)
        assert int(every["stalls"]) == len(stalls)
        for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            assert int(every[f"stall {label} ns"]) == exact(stalls["value"], q)
            for r in truth["rings"]:
                mine = stalls["value"][stalls["ring"] == r["index"]]
                assert int(table[side, str(r["index"])][f"stall {label} ns"]) == \
                    exact(mine, q)
    # the injected delay: every delayed stall lasts at least 20 ms, no base stall does
    assert int(table["new", "all"]["stall p50 ns"]) >= 20_000_000 > \
        int(table["base", "all"]["stall p50 ns"])

