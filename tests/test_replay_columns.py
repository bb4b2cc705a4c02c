"""Replay of a recording through its columnar blocks (Replay.feed_columns, what
``kvmtrace replay FILE.kvt`` does) against the record path (Replay.feed on EVENT_DTYPE
batches): identical reports, anomalies included, on random streams, several VMs, the
shared samples and the workload-like synthetic stream. No kernel needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_recording import synthetic
from test_replay_agree import PID, VM, random_stream, reference

from kvmtrace.analysis.replay import Replay, ReplayReport, replay_source
from kvmtrace.core.events import EVENT_DTYPE, Kind
from kvmtrace.core.sources import SourceMeta
from kvmtrace.source.detect import open_source
from kvmtrace.source.recording import RecordingWriter, open_recording


def write(path: Path, ev: np.ndarray, meta: SourceMeta | None = None,
          block_events: int = 1 << 16) -> Path:
    with RecordingWriter(path, meta or SourceMeta(kind="test"),
                         block_events=block_events) as w:
        w.write(ev)
    return path


def by_records(path: Path, **kw: object) -> ReplayReport:
    src = open_recording(path)
    rp = Replay(src.meta, **kw)  # type: ignore[arg-type]
    for b in src.batches():
        rp.feed(b)
    return rp.finish(lost=src.lost)


def by_columns(path: Path, **kw: object) -> tuple[ReplayReport, int]:
    """The columnar replay and how many blocks went through it (not through feed())."""
    src = open_recording(path)
    rp = Replay(src.meta, **kw)  # type: ignore[arg-type]
    fallback = 0
    feed = rp.feed

    def counting(ev: np.ndarray) -> None:
        nonlocal fallback
        fallback += 1
        feed(ev)

    rp.feed = counting  # type: ignore[method-assign]
    for parts in src.column_batches():
        rp.feed_columns(parts)
    return rp.finish(lost=src.lost), src.blocks - fallback


def assert_same(a: ReplayReport, b: ReplayReport) -> None:
    assert (a.events, a.lost) == (b.events, b.lost)
    assert [r.compare_key() for r in a.rings] == [r.compare_key() for r in b.rings]
    assert [x.key() for x in a.anomalies] == [x.key() for x in b.anomalies]
    assert {k: (w.windows, w.pushes, w.first_ns, w.last_ns) for k, w in a.workingset.items()} \
        == {k: (w.windows, w.pushes, w.first_ns, w.last_ns) for k, w in b.workingset.items()}
    assert list(a.workingset) == list(b.workingset)
    assert a.hottest == b.hottest
    assert a.harvested == b.harvested


@pytest.mark.parametrize("seed", range(16))
def test_columns_agree_on_random_streams(tmp_path: Path, seed: int):
    ev = random_stream(seed)
    ref = reference(ev)
    path = write(tmp_path / "r.kvt", ev, block_events=[37, 200, 611][seed % 3])
    cols, _ = by_columns(path, keep_harvest=True, window_ns=50_000)
    assert_same(cols, by_records(path, keep_harvest=True, window_ns=50_000))
    assert [x.key() for x in cols.anomalies] == [x.key() for x in ref.anomalies]
    assert cols.events == len(ev)


def test_columns_agree_with_several_vms_far_rings_and_two_threads(tmp_path: Path):
    a, b = random_stream(5), random_stream(105)
    b["pid"], b["vm"] = PID + 1, VM + 1
    c = random_stream(205)
    c["ring"] = np.where(c["ring"] >= 0, c["ring"] * 70, c["ring"])  # rings 0, 70, 140
    i = np.arange(len(c))  # 2 threads push into each ring in the first half
    c["tid"] = np.where((i % 2 == 0) | (i > len(c) // 2), c["tid"], c["tid"] + 1000)
    mix = np.concatenate([a, b, c])
    mix = mix[np.argsort(mix["ts"], kind="stable")]
    path = write(tmp_path / "m.kvt", mix, block_events=500)
    cols, ncol = by_columns(path, keep_harvest=True)
    assert_same(cols, by_records(path, keep_harvest=True))
    assert [x.key() for x in cols.anomalies] == [x.key() for x in reference(mix).anomalies]
    assert cols.anomalies and ncol >= 1


def test_columns_agree_on_samples(tmp_path: Path, samples: Path):
    for name, pushes in (("ftrace-1vcpu-8192B-800pages.txt", [800]),
                         ("perf-script-3vcpu-4096B-400pages.txt", [400, 400, 400])):
        src = open_source(samples / name)
        ev = np.concatenate(list(src.batches()))
        path = write(tmp_path / "s.kvt", ev, src.meta, block_events=100)
        cols, ncol = by_columns(path, keep_harvest=True)
        assert_same(cols, by_records(path, keep_harvest=True))
        assert [r.pushes for r in cols.rings] == pushes
        assert cols.anomalies == [] and ncol >= 1


def test_columns_agree_on_the_workload_like_stream(tmp_path: Path):
    ev = synthetic(300_000, vcpus=4, seed=13)
    path = write(tmp_path / "w.kvt", ev)
    cols, ncol = by_columns(path)
    assert_same(cols, by_records(path))
    assert cols.anomalies == []
    assert ncol == open_recording(path).blocks - 1  # the first holds the ring size event
    push = ev["kind"] == Kind.PUSH
    assert [r.pushes for r in cols.rings] == np.bincount(ev["ring"][push]).tolist()
    assert [r.soft_full_exits for r in cols.rings] == np.bincount(
        ev["ring"][ev["kind"] == Kind.EXIT], minlength=4).tolist()
    assert replay_source(open_recording(path)).rings == cols.rings


def test_columns_skip_other_kinds_and_single_group_blocks(tmp_path: Path):
    ev = np.zeros(6, EVENT_DTYPE)
    ev["ts"] = np.arange(6) + 100
    ev["kind"] = Kind.RESET_LAT
    ev["ring"] = -1
    ev["value"] = 5000
    path = write(tmp_path / "x.kvt", ev, block_events=3)
    cols, ncol = by_columns(path)
    assert (cols.events, cols.rings, ncol) == (6, [], 2)
    assert_same(cols, by_records(path))


def test_columns_agree_with_more_than_256_groups_per_block(tmp_path: Path):
    rings, per = 300, 40  # 300 rings x (pushes, reset): two-byte group numbers
    ev = np.zeros(rings * (per + 1), EVENT_DTYPE)
    ring = np.repeat(np.arange(rings), per + 1)
    k = np.tile(np.arange(per + 1), rings)
    ev["ring"], ev["pid"], ev["vm"] = ring, PID, VM
    ev["tid"] = np.where(k < per, PID + 1 + ring, PID)
    ev["kind"] = np.where(k < per, Kind.PUSH, Kind.RESET)
    ev["dirty_index"] = np.minimum(k + 1, per)
    ev["reset_index"] = np.where(k < per, 0, per - 3)  # 3 entries left in each ring
    ev["value"] = ring * 1000 + k
    ev["ts"] = 1000 + k * 10_000 + ring  # time order: the rings interleave
    ev = ev[np.argsort(ev["ts"], kind="stable")]
    meta = SourceMeta(kind="test", ring_entries={(PID, VM): 256})
    path = write(tmp_path / "g.kvt", ev, meta)
    cols, ncol = by_columns(path, keep_harvest=True)
    assert_same(cols, by_records(path, keep_harvest=True))
    assert ncol == 1 and cols.anomalies == []
    assert [(r.pushes, r.resets, r.entries_reset) for r in cols.rings] == [(40, 1, 37)] * 300


@pytest.mark.parametrize("seed", [0, 3])
def test_a_share_of_a_blocks_events_is_its_records(tmp_path: Path, seed: int):
    """A share of the rings (replay -j N) building only its groups' records from a
    block's columns gives exactly the records EventColumns.events() selects, field for
    field, whatever groups it holds (none, some, all)."""
    from kvmtrace.analysis.replay.colfeed import share_events

    ev = random_stream(seed)
    ev["pid"][::3] = PID + 1  # several VMs: more groups
    path = write(tmp_path / "s.kvt", ev, block_events=512)
    rng = np.random.default_rng(seed)
    tried = 0
    for parts in open_recording(path).column_batches():
        ng = len(parts.groups)
        for pick in (np.zeros(ng, bool), np.ones(ng, bool), rng.random(ng) < 0.5):
            want = parts.events()
            want = want[pick[parts.gid]] if parts.gid is not None else want[:len(want) * pick[0]]
            assert share_events(parts, pick).tobytes() == want.tobytes()
            tried += 1
    assert tried == 3 * open_recording(path).blocks
