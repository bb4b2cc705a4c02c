"""The recorder's fast paths: the writer's block buffer (events copied once, blocks encoded
straight from large inputs), the lookup-table group numbering, the sampled width choice and
the group-constant test. Exact round trips against the input; no kernel needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_recording import META, random_events, synthetic, unpadded

from kvmtrace.core.events import EVENT_DTYPE, Kind
from kvmtrace.source import recording_codec as codec
from kvmtrace.source.recording import RecordingWriter, open_recording
from kvmtrace.source.recording_decode import decode_parts


def block_counts(path: Path) -> list[int]:
    return [count for _, count in open_recording(path)._index]


@pytest.mark.parametrize("sizes", [[3, 5, 1, 13], [21], [7, 14], [6, 30, 2], [1] * 9])
def test_writer_blocks_are_exact_whatever_the_chunks(tmp_path: Path, sizes: list[int]):
    ev = synthetic(sum(sizes), vcpus=2, seed=len(sizes))
    path = tmp_path / "b.kvt"
    done = 0
    with RecordingWriter(path, META, block_events=7) as w:
        for n in sizes:
            w.write(ev[done : done + n])
            done += n
    # full blocks of 7 whether they came from the buffer or straight from a chunk
    assert block_counts(path) == [7] * (done // 7) + ([done % 7] if done % 7 else [])
    np.testing.assert_array_equal(open_recording(path).read_all(), unpadded(ev))


def test_writer_keeps_its_own_copy_of_pending_events(tmp_path: Path):
    ev = synthetic(50, vcpus=2, seed=4)
    path = tmp_path / "c.kvt"
    chunk = ev[:30].copy()
    with RecordingWriter(path, META, block_events=40) as w:
        w.write(chunk)  # pending: not encoded yet
        chunk["ts"] = 0  # the caller reuses its array
        chunk["value"] = 7
        w.write(ev[30:])
    np.testing.assert_array_equal(open_recording(path).read_all(), unpadded(ev))


def test_writer_flush_mid_block_then_more(tmp_path: Path):
    ev = synthetic(100, vcpus=3, seed=9)
    path = tmp_path / "f.kvt"
    with RecordingWriter(path, META, block_events=32) as w:
        w.write(ev[:10])
        w.flush()
        w.write(ev[10:80])  # 22 into the buffer, then 32 straight, then 16 pending
        w.flush()
        w.write(ev[80:])
    assert block_counts(path) == [10, 32, 32, 6, 20]
    np.testing.assert_array_equal(open_recording(path).read_all(), unpadded(ev))


def old_groups(ev: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The general numbering (bytes of each key row), as a reference."""
    keys = np.zeros(len(ev), codec.GROUP_DTYPE)
    for name in ("pid", "tid", "vm", "ring", "kind"):
        keys[name] = ev[name]
    table, inverse = np.unique(keys.view("V20"), return_inverse=True)
    return table.view(codec.GROUP_DTYPE), inverse.ravel()


def check_groups(ev: np.ndarray, small: bool) -> None:
    got = codec._groups_small(ev)
    assert (got is not None) == small
    table, gid, counts = codec._groups(ev)
    assert len(gid) == len(ev) and gid.dtype == (np.uint8 if len(table) <= 256 else np.uint16)
    for name in ("pid", "tid", "vm", "ring", "kind"):  # every event finds its own key
        np.testing.assert_array_equal(table[name][gid], ev[name])
    np.testing.assert_array_equal(counts, np.bincount(gid, minlength=len(table)))
    ref_table, _ = old_groups(ev)
    assert len(table) == len(ref_table)  # each distinct key once
    assert sorted(table.tobytes()[i : i + 20] for i in range(0, table.nbytes, 20)) == sorted(
        ref_table.tobytes()[i : i + 20] for i in range(0, ref_table.nbytes, 20))


def test_groups_lookup_table_matches_general_numbering():
    ev = synthetic(20_000, vcpus=4, seed=2)
    ev["vm"][::3] = -1  # negative values
    ev["pid"][::5] = 0xFFFFFFFF - 1  # a wide u32 range in one field: still small overall?
    check_groups(ev, small=False)  # pid spans 2**32: falls back
    ev["pid"][::5] = ev["pid"][1] + 3
    check_groups(ev, small=True)


def test_groups_radix_limit():
    ev = np.zeros(300, EVENT_DTYPE)
    ev["tid"] = np.arange(300) * 250  # span 74_751 > 65536: general path
    check_groups(ev, small=False)
    ev["tid"] = np.arange(300) * 200  # span 59_801 <= 65536, 300 groups: u16 numbers
    check_groups(ev, small=True)
    ev["ring"] = np.arange(300) % 2  # 59_801 * 2 > 65536 again
    check_groups(ev, small=False)


def test_sampled_width_choice_still_exact(tmp_path: Path):
    n = 65_536
    ev = np.zeros(n, EVENT_DTYPE)
    ev["kind"] = Kind.PUSH
    ev["ts"] = np.arange(n, dtype=np.uint64) * 3  # delta 3: 0 bits
    rng = np.random.default_rng(1)
    odd = rng.choice(n, 40, replace=False) | 1  # outliers the width sample (even) misses
    ev["ts"][odd] += np.uint64(1 << 40)
    ev["value"] = rng.integers(0, 1 << 62, n, dtype=np.uint64)  # all 64 bits
    ev["dirty_index"] = np.arange(n)
    ev["dirty_index"][odd] = 0xFFFFFFFF
    path = tmp_path / "s.kvt"
    with RecordingWriter(path, META) as w:
        w.write(ev)
    np.testing.assert_array_equal(open_recording(path).read_all(), ev)


@pytest.mark.parametrize("groups", [1, 3])
def test_group_constant_columns(groups: int):
    ev = np.zeros(1000, EVENT_DTYPE)
    ev["tid"] = np.arange(1000) % groups
    ev["kind"] = Kind.PUSH
    ev["slot"] = ev["tid"] * 10 + 1  # constant within each group, differs between groups
    ev["reset_index"] = 5
    ev["reset_index"][500] = 6  # one change inside a group: not constant
    ev["dirty_index"] = 9
    ev["dirty_index"][groups] = 8  # the second event of group 0 differs from its head
    ev["ts"] = np.arange(1000)
    parts = decode_parts(codec.encode_events(ev)[0])
    assert sorted(parts.const) == ["slot", "value"]
    assert sorted(parts.grouped) == ["dirty_index", "reset_index"]
    np.testing.assert_array_equal(parts.const["slot"], np.arange(groups) * 10 + 1)
    np.testing.assert_array_equal(parts.events(), ev)


def test_random_bytes_in_odd_chunks(tmp_path: Path):
    ev = random_events(10_000, seed=77)
    path = tmp_path / "r.kvt"
    with RecordingWriter(path, META, block_events=4096) as w:
        for a, b in [(0, 1), (1, 5000), (5000, 5001), (5001, 10_000)]:
            w.write(ev[a:b])
    assert block_counts(path) == [4096, 4096, 1808]
    np.testing.assert_array_equal(open_recording(path).read_all(), ev)


def test_strided_input(tmp_path: Path):
    ev = synthetic(3000, vcpus=2, seed=8)
    path = tmp_path / "s.kvt"
    with RecordingWriter(path, META, block_events=500) as w:
        w.write(ev[::2])  # not contiguous: 3 blocks straight from the view
        w.write(ev[1::2][:700])  # then through the buffer
    np.testing.assert_array_equal(open_recording(path).read_all(),
                                  unpadded(np.concatenate([ev[::2], ev[1::2][:700]])))


V10 = Path(__file__).resolve().parent / "data" / "recordings" / \
    "workload-2vcpu-4096B-400pages-v1.0.kvt"


def events_payloads(path: Path) -> list[bytes]:
    """The EVENTS block payloads of a recording, as stored (codec 0)."""
    from kvmtrace.source.recording import BLOCK_HEADER

    out = []
    with open(path, "rb") as f:
        for offset, _ in open_recording(path)._index:
            f.seek(offset)
            head = BLOCK_HEADER.unpack(f.read(BLOCK_HEADER.size))
            assert head[2] == 0
            out.append(f.read(head[4]))
    return out


@pytest.mark.parametrize("chunks", [[824], [1, 100, 723], [411, 413]])
def test_a_real_recording_is_written_again_byte_for_byte(tmp_path: Path, chunks: list[int]):
    """The events of a real run recorded by the format 1.0 writer (tests/data/recordings),
    written again today, whole or in pieces through the writer's column buffer, give the
    very EVENTS payload that writer stored."""
    old = events_payloads(V10)
    ev = open_recording(V10).read_all()
    assert codec.encode_events(ev) == old
    path = tmp_path / "again.kvt"
    with RecordingWriter(path, META) as w:
        done = 0
        for n in chunks:
            w.write(ev[done : done + n])
            done += n
    assert events_payloads(path) == old
    np.testing.assert_array_equal(open_recording(path).read_all(), ev)


def test_block_buffer_filled_in_pieces_encodes_as_the_whole():
    ev = synthetic(9000, vcpus=3, seed=5)
    buf = codec.BlockBuffer(9000)
    for a, b in [(0, 1), (1, 4000), (4000, 4000), (4000, 9000)]:
        buf.put(ev[a:b])
    assert len(buf) == 9000
    assert codec.encode_block(buf) == codec.encode_events(ev)[0]
    np.testing.assert_array_equal(buf["reset_index"], ev["reset_index"])
    with pytest.raises(ValueError):
        buf.put(ev[:1])  # full
    buf.clear()
    buf.put(ev[::3])  # strided input
    assert codec.encode_block(buf) == codec.encode_events(np.ascontiguousarray(ev[::3]))[0]
    with pytest.raises(ValueError):
        codec.BlockBuffer(codec.MAX_BLOCK_EVENTS + 1)
