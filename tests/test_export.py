"""Parquet and Perfetto exports, and ``kvmtrace export`` on good and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from test_recording import META, synthetic

from kvmtrace import cli
from kvmtrace.core.events import Kind, empty
from kvmtrace.source.recording import RecordingWriter, meta_to_dict, open_recording
from kvmtrace.views.perfetto import export_perfetto

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # a test dependency (pip install -e .[test]; tools/setup.sh --test)
    pa = pq = None


@pytest.fixture(autouse=True)
def _pyarrow() -> None:
    require(pa is not None, "pyarrow not installed (tools/setup.sh --test installs it)")


def record(path: Path, ev: np.ndarray, lost: int = 0) -> Path:
    with RecordingWriter(path, META, block_events=5000) as w:
        w.write(ev)
        w.add_lost(lost)
    return path


def test_parquet_equals_events(tmp_path: Path) -> None:
    from kvmtrace.views.parquet import export_parquet

    ev = synthetic(40_000, vcpus=3, seed=4)
    rec = open_recording(record(tmp_path / "r.kvt", ev, lost=9))
    assert export_parquet(rec, tmp_path / "r.parquet", row_group_rows=7000) == len(ev)
    f = pq.ParquetFile(tmp_path / "r.parquet")
    assert f.metadata.num_row_groups == 6
    t = f.read()
    push = ev["kind"] == Kind.PUSH
    for col, field in [("ts_ns", "ts"), ("pid", "pid"), ("tid", "tid"), ("vm", "vm"),
                       ("ring", "ring"), ("dirty_index", "dirty_index"),
                       ("reset_index", "reset_index"), ("slot", "slot")]:
        np.testing.assert_array_equal(t[col].to_numpy(), ev[field].astype(np.int64), col)
    names = {int(k): k.name.lower() for k in Kind}
    assert t["kind"].to_pylist() == [names[k] for k in ev["kind"].tolist()]
    offset = t["offset"].to_numpy(zero_copy_only=False)
    value = t["value"].to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(offset[push], ev["value"][push].astype(np.int64))
    np.testing.assert_array_equal(value[~push], ev["value"][~push].astype(np.int64))
    assert t["offset"].null_count == int((~push).sum())
    assert t["value"].null_count == int(push.sum())
    kv = f.metadata.metadata
    assert json.loads(kv[b"kvmtrace.meta"]) == json.loads(json.dumps(meta_to_dict(rec.meta)))
    assert kv[b"kvmtrace.lost"] == b"9"


def small_stream() -> np.ndarray:
    """One VM (pid 100, vm 5), rings 0 and 1, every kind; used counts known by hand."""
    rows = [  # ts, value, tid, dirty, reset, slot, ring, kind
        (1000, 7, 101, 1, 0, 0, 0, Kind.PUSH),
        (2000, 8, 101, 2, 0, 0, 0, Kind.PUSH),
        (2500, 30, 102, 1, 0, 0, 1, Kind.PUSH),
        (3000, 9, 101, 3, 0, 0, 0, Kind.PUSH),
        (3100, 0, 101, 3, 0, 0, 0, Kind.EXIT),
        (4000, 31, 102, 2, 0, 0, 1, Kind.PUSH),
        (9000, 2, 100, 3, 3, 0, 0, Kind.RESET),
        (9100, 0, 100, 2, 2, 0, 1, Kind.RESET),
        (9500, 1500, 100, 0, 0, 0, -1, Kind.RESET_LAT),
        (10000, 6900, 101, 3, 3, 0, 0, Kind.STALL),
        (11000, 10, 101, 4, 3, 0, 0, Kind.PUSH),
    ]
    ev = empty(len(rows) + 1)
    ev[0] = (500, 4096, 100, 100, 0, 0, 223, -1, 5, Kind.RING_SIZE, b"")
    for i, (ts, value, tid, di, ri, slot, ring, kind) in enumerate(rows, 1):
        ev[i] = (ts, value, 100, tid, di, ri, slot, ring, 5, kind, b"")
    return ev


def load_trace(path: Path) -> tuple[list[dict], dict]:
    doc = json.loads(path.read_text())
    return doc["traceEvents"], doc["metadata"]


def test_perfetto_small_known_stream(tmp_path: Path) -> None:
    rec = open_recording(record(tmp_path / "s.kvt", small_stream(), lost=2))
    n = export_perfetto(rec, tmp_path / "s.json", counter_interval_ns=0)
    events, metadata = load_trace(tmp_path / "s.json")
    assert n == len(events)
    assert metadata["kvmtrace"]["lost"] == 2
    labels = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    # META's default ring size (-1, -1) -> 256 entries labels the ring tracks
    assert set(labels) == {"vm 5", "vm 5 ring 0 (256 entries)", "vm 5 ring 1 (256 entries)"}
    tids = {name.split(" (")[0]: tid for name, tid in labels.items()}
    assert [e["args"]["name"] for e in events if e["name"] == "process_name"] == ["VMM 100"]
    assert all(e["pid"] == 100 for e in events)

    def on(track: str, ph: str) -> list[dict]:
        return sorted((e for e in events if e["ph"] == ph and e.get("tid") == tids[track]),
                      key=lambda e: e["ts"])

    used0 = [(e["ts"], e["args"]["used"]) for e in on("vm 5 ring 0", "C")]
    assert used0 == [(1.0, 1), (2.0, 2), (3.0, 3), (9.0, 0), (11.0, 1)]
    assert {e["name"] for e in on("vm 5 ring 0", "C")} == {"vm 5 ring 0 used"}
    used1 = [(e["ts"], e["args"]["used"]) for e in on("vm 5 ring 1", "C")]
    assert used1 == [(2.5, 1), (4.0, 2), (9.1, 0)]
    stalls = on("vm 5 ring 0", "X")
    assert [(e["name"], e["ts"], e["dur"]) for e in stalls] == [("soft-full stall", 3.1, 6.9)]
    inst0 = [(e["name"], e["ts"], e["args"].get("entries_reset")) for e in on("vm 5 ring 0", "i")]
    assert inst0 == [("soft-full exit", 3.1, None), ("reset", 9.0, 3)]
    assert [e["args"]["entries_reset"] for e in on("vm 5 ring 1", "i")] == [2]
    vm = on("vm 5", "X")
    assert [(e["name"], e["ts"], e["dur"]) for e in vm] == [("KVM_RESET_DIRTY_RINGS", 8.0, 1.5)]
    assert [e["args"] for e in on("vm 5", "i")] == [{"bytes": 4096, "entries": 256, "cap": 223}]


def test_perfetto_sampling_keeps_peaks(tmp_path: Path) -> None:
    ev = synthetic(60_000, vcpus=2, seed=8)
    rec = open_recording(record(tmp_path / "p.kvt", ev))
    export_perfetto(rec, tmp_path / "p.json", counter_interval_ns=1_000_000)
    events, _ = load_trace(tmp_path / "p.json")
    tids = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    for ring in (0, 1):
        mine = ev[(ev["ring"] == ring) & np.isin(ev["kind"], [Kind.PUSH, Kind.RESET])]
        used = (mine["dirty_index"] - mine["reset_index"]).astype(int)
        resets = np.flatnonzero(mine["kind"] == Kind.RESET)
        want = {(int(mine["ts"][i]), int(used[i])) for i in np.concatenate([resets, resets - 1])}
        got = {(round(e["ts"] * 1000), e["args"]["used"]) for e in events
               if e["ph"] == "C" and e["tid"] == tids[f"vm 11 ring {ring} (512 entries)"]}
        assert want <= got  # every pre-reset peak and every post-reset value is there
        assert max(u for _, u in got) == used.max()
        assert len(got) < len(mine) // 5  # but far from every push
        assert (int(mine["ts"][-1]), int(used[-1])) in got  # and the final value


def run_cli(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(cli, "COMMANDS", ("export",))
    return cli.main(["export", *argv])


def test_cli_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    src = record(tmp_path / "c.kvt", small_stream())
    assert run_cli(monkeypatch, str(src), "--parquet", str(tmp_path / "c.parquet")) == 0
    assert pq.read_table(tmp_path / "c.parquet").num_rows == 12
    assert run_cli(monkeypatch, str(src), "--perfetto", str(tmp_path / "c.json"),
                   "--counter-interval-us", "0") == 0
    assert len(load_trace(tmp_path / "c.json")[0]) > 12
    capsys.readouterr()


@pytest.mark.parametrize("case", ["garbage", "missing", "outdir", "negative"])
def test_cli_export_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str], case: str) -> None:
    good = record(tmp_path / "g.kvt", small_stream())
    text = tmp_path / "t.kvt"
    text.write_bytes(np.random.default_rng(3).bytes(3000))
    argv = {
        "garbage": [str(text), "--parquet", str(tmp_path / "o.parquet")],
        "missing": [str(tmp_path / "nope.kvt"), "--perfetto", str(tmp_path / "o.json")],
        "outdir": [str(good), "--parquet", str(tmp_path / "no" / "dir" / "o.parquet")],
        "negative": [str(good), "--perfetto", "x.json", "--counter-interval-us", "-1"],
    }[case]
    assert run_cli(monkeypatch, *argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvmtrace export: error: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("jobs", [2, 3])
def test_parquet_on_several_cores_is_the_same_file(tmp_path: Path, jobs: int) -> None:
    """Row groups built and written by threads (``jobs``) give the bytes ``jobs=1``
    writes: many row groups, the last one short, more groups than threads in flight."""
    from kvmtrace.views.parquet import export_parquet

    ev = synthetic(40_000, vcpus=3, seed=5)
    path = record(tmp_path / "r.kvt", ev, lost=2)
    outs = []
    for j in (1, jobs):
        out = tmp_path / f"r{j}.parquet"
        assert export_parquet(open_recording(path), out, row_group_rows=3000, jobs=j) == len(ev)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert pq.ParquetFile(tmp_path / f"r{jobs}.parquet").metadata.num_row_groups == 14


def test_parquet_on_several_cores_keeps_the_sources_error(tmp_path: Path) -> None:
    """A recording damaged in its middle: the same one-line error with ``-j 3`` as with
    ``-j 1``, and no output file left behind either way."""
    ev = synthetic(40_000, vcpus=3, seed=6)
    path = record(tmp_path / "d.kvt", ev)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(64)  # inside a middle block: its CRC fails
    path.write_bytes(bytes(data))
    errs = []
    for j in ("1", "3"):
        out = tmp_path / f"d{j}.parquet"
        proc = cli_run(str(path), "--parquet", str(out), "-j", j, "--row-group-rows", "3000")
        assert proc[0] == 2 and not out.exists()
        errs.append(proc[1].replace(f"d{j}.parquet", "OUT"))
    assert errs[0] == errs[1]
    assert errs[0].count("\n") == 1 and "Traceback" not in errs[0]


def cli_run(*argv: str) -> tuple[int, str]:
    """``kvmtrace export ARGV`` in a child process: (exit status, stderr)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "kvmtrace", "export", *argv],
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr
