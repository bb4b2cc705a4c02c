"""Importers of the kernel's own text (tracefs ``trace``, ``perf script``) through the
replay: the shared samples (tests/data/samples) give exactly the counts their README
states; perf script variants made by editing the sample; bad inputs are one-line errors
with exit status 2. No kernel needed."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import kvmtrace_cmd

from kvmtrace.analysis.replay import ReplayReport, replay_source
from kvmtrace.core.events import Kind
from kvmtrace.errors import UsageError
from kvmtrace.source.detect import detect_format, open_source

FTRACE = "ftrace-1vcpu-8192B-800pages.txt"
PERF = "perf-script-3vcpu-4096B-400pages.txt"


def replay(path: Path, **size: int) -> ReplayReport:
    return replay_source(open_source(path, **size), keep_harvest=True)


def events(path: Path) -> np.ndarray:
    return np.concatenate(list(open_source(path).batches()))


def assert_one_index_per_push(ev: np.ndarray) -> None:
    for r in np.unique(ev["ring"][ev["kind"] == Kind.PUSH]):
        di = ev["dirty_index"][(ev["kind"] == Kind.PUSH) & (ev["ring"] == r)].astype(np.int64)
        assert (np.diff(di) == 1).all() and di[0] == 1


def test_ftrace_sample_detected_and_replayed_exactly(samples: Path):
    path = samples / FTRACE
    assert detect_format(path) == "ftrace"
    rep = replay(path)
    assert rep.source_kind == "ftrace" and rep.lost == 0 and rep.anomalies == []
    (r,) = rep.rings
    assert r.ring[2] == 0
    assert (r.pushes, r.soft_full_exits, r.resets) == (800, 1, 2)
    assert (r.dirty_index, r.reset_index, r.entries_reset, r.harvested) == (800, 800, 800, 800)
    assert (r.size, r.size_source, r.max_used) == (512, "inferred", 448)  # soft limit 448
    assert r.lost_pushes == r.overwritten == 0
    # the guest wrote 800 distinct pages: 0x100 .. 0x41f of slot 0, each harvested once
    assert sorted(rep.harvested[r.ring]) == [(0, 0x100 + k) for k in range(800)]
    assert_one_index_per_push(events(path))


def test_perf_sample_detected_and_replayed_exactly(samples: Path):
    path = samples / PERF
    assert detect_format(path) == "perf-script"
    rep = replay(path)
    assert rep.source_kind == "perf-script" and rep.lost == 0 and rep.anomalies == []
    assert [r.ring[2] for r in rep.rings] == [0, 1, 2]
    assert sum(r.pushes for r in rep.rings) == 1200
    for r in rep.rings:
        assert r.pushes == r.harvested == r.entries_reset == 400
        assert r.dirty_index == r.reset_index == 400  # every ring ends fully reset
        assert (r.size, r.size_source) == (256, "inferred")  # soft limit 192
        assert r.max_used <= 192
    assert [r.soft_full_exits for r in rep.rings] == [2, 0, 0]
    assert rep.rings[0].max_used == 192
    assert_one_index_per_push(events(path))


@pytest.mark.parametrize("name, size, entries", [
    (FTRACE, {"ring_entries": 1024}, 1024),
    (FTRACE, {"ring_bytes": 8192}, 512),
    (PERF, {"ring_bytes": 16384}, 1024),
])
def test_ring_size_flag_overrides_inference(samples: Path, name: str, size: dict,
                                            entries: int):
    rep = replay(samples / name, **size)
    assert {(r.size, r.size_source) for r in rep.rings} == {(entries, "meta")}
    assert rep.anomalies == []


def test_too_small_ring_size_flag_shows_as_overflow(samples: Path):
    rep = replay(samples / FTRACE, ring_entries=256)  # the real ring had 512 entries
    r = rep.rings[0]
    assert (r.size, r.size_source) == (256, "meta")
    # pushes 1..448 before the reset at the exit, 449..800 after: each run overflows
    assert r.overwritten == (448 - 256) + (352 - 256)
    assert {a.kind.value for a in rep.anomalies} == {"overflow", "no_exit"}


def edit(samples: Path, tmp_path: Path, name: str, pattern: str, repl: str) -> Path:
    text = (samples / name).read_text()
    new, n = re.subn(pattern, repl, text, flags=re.M)
    assert n >= 1200
    out = tmp_path / name
    out.write_text(new)
    return out


def test_perf_script_ns_variant(samples: Path, tmp_path: Path):
    path = edit(samples, tmp_path, PERF, r"(\d+\.\d{6}):", r"\g<1>123:")  # perf script --ns
    assert detect_format(path) == "perf-script"
    base, ns = events(samples / PERF), events(path)
    assert len(ns) == len(base)
    assert (ns["ts"] == base["ts"] + 123).all()
    rep = replay(path)
    assert [r.pushes for r in rep.rings] == [400, 400, 400] and rep.anomalies == []


def test_perf_script_pid_tid_variant(samples: Path, tmp_path: Path):
    # perf script -F comm,pid,tid,cpu,time,event,trace prints "pid/tid"
    path = edit(samples, tmp_path, PERF, r"^(\s*python3\s+)(\d+)(\s+\[)", r"\g<1>5400/\2\3")
    assert detect_format(path) == "perf-script"
    ev = events(path)
    assert set(ev["pid"].tolist()) == {5400}
    assert (ev["tid"] == events(samples / PERF)["tid"]).all()
    rep = replay(path)
    assert [r.ring for r in rep.rings] == [(5400, -1, 0), (5400, -1, 1), (5400, -1, 2)]
    assert [r.pushes for r in rep.rings] == [400, 400, 400] and rep.anomalies == []


def test_lost_events_line_is_counted(samples: Path, tmp_path: Path):
    text = (samples / FTRACE).read_text().splitlines(keepends=True)
    pos = next(i for i, line in enumerate(text) if "dirty 0x64 " in line)
    del text[pos:pos + 2]  # push 0x64 (and its I/O exit) fell out ...
    text.insert(pos, "CPU:1 [LOST 2 EVENTS]\n")  # ... and tracefs said so
    path = tmp_path / FTRACE
    path.write_text("".join(text))
    rep = replay(path)
    assert rep.lost == 2 and rep.exit_status == 1
    (gap,) = [a for a in rep.anomalies if a.kind.value == "gap"]
    assert (gap.dirty_index, gap.count, gap.extra["expected"]) == (0x65, 1, 0x64)


# -- bad inputs ------------------------------------------------------------------------
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "perf.data").write_bytes(b"PERFILE2" + bytes(200))
    (tmp_path / "blob.bin").write_bytes(np.random.default_rng(1).bytes(5000))
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("nothing to see here\n" * 10)
    (tmp_path / "adir").mkdir()
    return {"perf.data": tmp_path / "perf.data", "binary": tmp_path / "blob.bin",
            "empty": tmp_path / "empty.txt", "text": tmp_path / "notes.txt",
            "directory": tmp_path / "adir", "missing": tmp_path / "nope.txt"}


@pytest.mark.parametrize("what", ["perf.data", "binary", "empty", "text", "directory",
                                  "missing"])
def test_bad_input_is_a_one_line_error(tmp_path: Path, what: str):
    path = bad_inputs(tmp_path)[what]
    with pytest.raises(UsageError):
        open_source(path)
    p = subprocess.run(kvmtrace_cmd("replay", str(path)), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmtrace replay: error: ")
    assert "(fix: " in lines[0] and "Traceback" not in p.stderr
    if what == "perf.data":
        assert "perf script -i" in lines[0]
