"""Recording format: exact round trips, torn tails, killed writers, meta, lost, bad files."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from kvmtrace.analysis.replay import replay_source
from kvmtrace.core.events import EVENT_DTYPE, Kind
from kvmtrace.core.sources import SourceMeta
from kvmtrace.errors import UsageError
from kvmtrace.source.recording import (
    MAGIC,
    RecordingWriter,
    is_recording,
    open_recording,
)
from kvmtrace.testing.synth import workload_stream as synthetic

ROOT = Path(__file__).resolve().parents[1]

META = SourceMeta(
    kind="live",
    kernel_release="6.18.0-test",
    host="testhost",
    start_time=1700000000.25,
    hooks={"kvm:kvm_dirty_ring_push": "raw_tp", "kvm:kvm_dirty_ring_reset": "tp"},
    tracepoint_formats={"kvm:kvm_dirty_ring_push": "name: kvm_dirty_ring_push\nID: 1\n"},
    ring_entries={(4321, 11): 512, (-1, -1): 256},
    extra={"comm": {"4321": "qemu"}},
)


def random_events(n: int, seed: int) -> np.ndarray:
    """Every byte random (pad zero): exercises wrap-around of every delta."""
    rng = np.random.default_rng(seed)
    ev = np.frombuffer(rng.bytes(n * EVENT_DTYPE.itemsize), EVENT_DTYPE).copy()
    ev["pad"] = b""
    return ev


def unpadded(ev: np.ndarray) -> np.ndarray:
    ev = ev.copy()
    ev["pad"] = b""
    return ev


def roundtrip(tmp_path: Path, ev: np.ndarray, **kw: object) -> np.ndarray:
    path = tmp_path / "r.kvt"
    with RecordingWriter(path, META, **kw) as w:  # type: ignore[arg-type]
        w.write(ev)
    rec = open_recording(path)
    assert rec.events == len(ev)
    assert not rec.truncated and rec.torn_bytes == 0
    return rec.read_all()


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 70_000])
def test_roundtrip_random_bytes(tmp_path: Path, n: int) -> None:
    ev = random_events(n, seed=n)
    got = roundtrip(tmp_path, ev)
    assert got.dtype == EVENT_DTYPE
    np.testing.assert_array_equal(got, ev)


def test_roundtrip_realistic_all_kinds(tmp_path: Path) -> None:
    for pattern in ("seq", "random"):
        ev = synthetic(150_000, vcpus=4, pattern=pattern, seed=7)
        assert set(np.unique(ev["kind"])) == {int(k) for k in Kind}
        got = roundtrip(tmp_path, ev, block_events=40_000)
        np.testing.assert_array_equal(got, unpadded(ev))
        # a clean workload: the replay of the generator's stream finds nothing
        report = replay_source(open_recording(tmp_path / "r.kvt"))
        assert report.anomalies == []
        assert sum(r.pushes for r in report.rings) == int((ev["kind"] == Kind.PUSH).sum())


def test_small_blocks_and_few_values(tmp_path: Path) -> None:
    ev = synthetic(5000, vcpus=2, seed=3)
    ev[100:200]["ts"] = ev[100]["ts"]  # equal timestamps
    ev[300]["dirty_index"] = 0xFFFFFFFF  # wrap
    ev[301]["value"] = 0xFFFFFFFFFFFFFFFF
    got = roundtrip(tmp_path, ev, block_events=7)
    np.testing.assert_array_equal(got, unpadded(ev))


def test_compact_on_workload_like_stream(tmp_path: Path) -> None:
    ev = synthetic(400_000, vcpus=4, pattern="seq", seed=11)
    path = tmp_path / "c.kvt"
    with RecordingWriter(path, META) as w:
        w.write(ev)
    assert path.stat().st_size / len(ev) <= 3.0


def test_meta_lost_and_update_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "m.kvt"
    ev = synthetic(3000, vcpus=2, seed=5)
    with RecordingWriter(path, META) as w:
        w.write(ev[:1000])
        w.add_lost(3)
        w.flush()
        w.write(ev[1000:])
        w.add_lost(4)
        w.update_meta(ring_entries={(4321, 12): 1024}, host="other")
    rec = open_recording(path)
    assert rec.lost == 7
    assert rec.events == 3000
    assert rec.meta.kind == "recording"
    assert rec.meta.extra["source_kind"] == "live"
    assert rec.meta.extra["comm"] == {"4321": "qemu"}
    assert rec.meta.kernel_release == META.kernel_release
    assert rec.meta.host == "other"
    assert rec.meta.start_time == META.start_time
    assert rec.meta.hooks == META.hooks
    assert rec.meta.tracepoint_formats == META.tracepoint_formats
    assert rec.meta.ring_entries == {(4321, 11): 512, (-1, -1): 256, (4321, 12): 1024}
    assert rec.meta.ring_size(4321, 12) == 1024
    assert (rec.ts_first, rec.ts_last) == (int(ev["ts"].min()), int(ev["ts"].max()))


def write_in_flushes(path: Path, ev: np.ndarray, sizes: list[int],
                     lost_each: int = 0) -> list[tuple[int, int, int]]:
    """Write chunk by chunk, flushing the events, then the lost count; returns (file size,
    events, lost) after each flush: what a reader of a prefix of the file must see."""
    done = 0
    with RecordingWriter(path, META) as w:
        points = [(w.bytes_written, 0, 0)]
        for n in sizes:
            w.write(ev[done : done + n])
            done += n
            w.flush()
            points.append((w.bytes_written, done, w.lost))
            if lost_each:
                w.add_lost(lost_each)
                w.flush()
                points.append((w.bytes_written, done, w.lost))
    return points


def test_truncated_at_random_positions(tmp_path: Path) -> None:
    ev = synthetic(20_000, vcpus=2, seed=9)
    full = tmp_path / "full.kvt"
    points = write_in_flushes(full, ev, [3000, 1, 5000, 999, 6000, 5000], lost_each=2)
    data = full.read_bytes()
    rng = np.random.default_rng(1)
    cuts = {*rng.integers(len(MAGIC), len(data), 60).tolist(), *(p[0] for p in points[1:]),
            len(MAGIC), 12, 16, len(data) - 1}
    cut_file = tmp_path / "cut.kvt"
    for cut in sorted(cuts):
        cut_file.write_bytes(data[:cut])
        rec = open_recording(cut_file)
        end, events, lost = max((p for p in points if p[0] <= cut), default=(0, 0, 0))
        assert rec.truncated
        assert (rec.events, rec.lost) == (events, lost), cut
        if end:
            assert rec.torn_bytes == cut - end
        np.testing.assert_array_equal(rec.read_all(), unpadded(ev[:events]))
    rec = open_recording(full)
    assert (rec.events, rec.lost, rec.truncated) == (20_000, 12, False)


CHILD = textwrap.dedent(
    """
    import signal, sys
    sys.path.insert(0, {root!r})
    from tests.test_recording import META, synthetic
    from kvmtrace.source.recording import RecordingWriter
    if {term}:
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    ev = synthetic(50_000, vcpus=2, seed=21)
    done = 0
    with RecordingWriter({path!r}, META) as w:
        while True:
            w.write(ev[done : done + 4000])
            done += 4000
            w.add_lost(1)
            w.flush()
            w.write(ev[done : done + 100])  # pending, never flushed before the kill
            done += 100
            print(done - 100, flush=True)
            sys.stdin.readline()
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_writer_killed(tmp_path: Path, sig: signal.Signals) -> None:
    path = tmp_path / "k.kvt"
    code = CHILD.format(root=str(ROOT), path=str(path), term=sig == signal.SIGTERM)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdin and child.stdout
    flushed = []
    for i in range(3):
        flushed.append(int(child.stdout.readline()))
        if i < 2:
            child.stdin.write("\n")
            child.stdin.flush()
    child.send_signal(sig)
    child.wait(timeout=30)
    partial = tmp_path / f"k.kvt.{child.pid}.partial"  # what the writer writes until closed
    # SIGKILL: the .partial file stays, k.kvt was never made; a clean close renames it
    assert (partial.exists(), path.exists()) == (sig == signal.SIGKILL, sig != signal.SIGKILL)
    rec = open_recording(partial if sig == signal.SIGKILL else path)
    ev = synthetic(50_000, vcpus=2, seed=21)
    if sig == signal.SIGKILL:
        assert rec.truncated and rec.torn_bytes == 0
        assert rec.events == flushed[-1] == 3 * 4000 + 2 * 100
        assert rec.lost == 3
    else:  # clean close: the pending 100 events and the END block are written
        assert not rec.truncated
        assert rec.events == flushed[-1] + 100
        assert rec.lost == 3
    np.testing.assert_array_equal(rec.read_all(), unpadded(ev[: rec.events]))


def test_corrupt_middle_block(tmp_path: Path) -> None:
    path = tmp_path / "x.kvt"
    ev = synthetic(30_000, vcpus=2, seed=2)
    points = write_in_flushes(path, ev, [10_000, 10_000, 10_000])
    data = bytearray(path.read_bytes())
    data[(points[2][0] + points[3][0]) // 2] ^= 0xFF  # inside the second EVENTS block
    path.write_bytes(bytes(data))
    rec = open_recording(path)
    assert rec.events == 30_000 and not rec.truncated
    with pytest.raises(UsageError, match="CRC mismatch"):
        rec.read_all()


BAD_FILES = [
    b"",
    b"hello world\n" * 10,
    np.random.default_rng(0).bytes(4096),
    MAGIC[:5],
    MAGIC + b"\x09\x00\x00\x00\x00\x00\x00\x00",  # format 9.0: newer than we read
]


@pytest.mark.parametrize("content", BAD_FILES)
def test_bad_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.kvt"
    path.write_bytes(content)
    assert is_recording(path) == content.startswith(MAGIC)
    with pytest.raises(UsageError) as err:
        open_recording(path)
    assert "\n" not in str(err.value)


def test_missing_and_directory(tmp_path: Path) -> None:
    for p in (tmp_path / "nope.kvt", tmp_path):
        assert is_recording(p) is False
        with pytest.raises(UsageError):
            open_recording(p)


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        RecordingWriter(tmp_path / "no" / "such" / "dir.kvt", META)
    with RecordingWriter(tmp_path / "w.kvt", META) as w:
        with pytest.raises(UsageError):
            w.write(np.zeros(3, np.uint64))
    rec = open_recording(tmp_path / "w.kvt")
    assert rec.events == 0 and not rec.truncated and len(rec.read_all()) == 0
