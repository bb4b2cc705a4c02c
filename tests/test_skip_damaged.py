"""``--skip-damaged`` (issue 10, item 2): a recording damaged in the middle is a format
error naming the offset (exit 2); with the flag, replay, export, compare and
``top --replay`` skip the damaged block, resync at the next block header, read every sound
block and say what they skipped (text and JSON).

Ground truth comes from the file's own block headers, walked here with struct (not by the
reader under test): each EVENTS block's offset, length and declared event count. The
oracle for the commands' output is the same recording with that block cut out by those
offsets: a sound file, read without the flag.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import kvmtrace_cmd, record_workload, require_kvm_bpf
from test_recording import META, synthetic

from kvmtrace.errors import UsageError
from kvmtrace.source.recording import RecordingWriter

HEADER = struct.Struct("<4sBBHIIIQQI")  # docs/FORMAT.md, block header
EVENTS = 2


def block_table(data: bytes) -> list[tuple[int, int, int, int]]:
    """(offset, type, bytes with header, declared events) of every block, from the headers."""
    out, pos = [], 16
    while pos + HEADER.size <= len(data):
        f = HEADER.unpack_from(data, pos)
        assert f[0] == b"KTBK"
        out.append((pos, f[1], HEADER.size + f[4], f[6]))
        pos += HEADER.size + f[4]
    assert pos == len(data)
    return out


def damage(data: bytes, block: tuple[int, int, int, int], how: str) -> bytes:
    """``payload``: one byte of the block's payload flipped (its CRC fails); ``header``:
    its sync word overwritten (the reader must find the next block by itself)."""
    out = bytearray(data)
    off, _, length, _ = block
    if how == "payload":
        out[off + HEADER.size + (length - HEADER.size) // 2] ^= 0xFF
    else:
        out[off:off + 4] = b"XXXX"
    return bytes(out)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd(*args), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real recording of the built-in VMM, several EVENTS blocks (one per second)."""
    require_kvm_bpf()
    return record_workload(tmp_path_factory.mktemp("rec"), "--vcpus", "2", "--ring-bytes",
                           "4096", "--pages", "300", "--exit-every", "4",
                           "--duration", "4").path


@pytest.fixture(params=["payload", "header"])
def damaged(request: pytest.FixtureRequest, recorded: Path, tmp_path: Path
            ) -> tuple[Path, Path, tuple[int, int, int, int], int]:
    """(damaged file, the same file with the block cut out, the block, events expected)."""
    data = recorded.read_bytes()
    table = block_table(data)
    events = [b for b in table if b[1] == EVENTS]
    assert len(events) >= 3, table
    block = events[len(events) // 2]  # neither the first nor the last
    off, _, length, count = block
    bad, cut = tmp_path / "bad.kvt", tmp_path / "cut.kvt"
    bad.write_bytes(damage(data, block, request.param))
    cut.write_bytes(data[:off] + data[off + length:])
    return bad, cut, block, sum(b[3] for b in events) - count


def test_without_the_flag_damage_is_an_error_with_its_offset(damaged) -> None:
    bad, _, (off, _, _, _), _ = damaged
    for args in (["replay", str(bad)], ["export", str(bad), "--parquet", str(bad) + ".pq"],
                 ["top", "-b", "--replay", str(bad), "-d", "0.001"],
                 ["compare", str(bad), str(bad)]):
        p = run(*args)
        assert p.returncode == 2, (args, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and f"at byte {off}" in lines[0], (args, p.stderr)


def _warning(bad: Path, block: tuple[int, int, int, int]) -> str:
    off, _, length, _ = block
    return (f"{bad}: skipped 1 damaged block ({length} bytes) at byte {off} "
            "(--skip-damaged); read the rest")


def test_replay_skips_the_damaged_block_and_says_so(damaged) -> None:
    """replay --json --skip-damaged: every event of every other block (total minus the
    block's declared count), the same report as the file without that block, and the
    skip in the JSON warnings and on stderr."""
    bad, cut, block, expected = damaged
    p, ref = run("replay", "--json", "--skip-damaged", str(bad)), run("replay", "--json",
                                                                       str(cut))
    assert p.returncode == ref.returncode and p.returncode in (0, 1), p.stderr
    got, want = json.loads(p.stdout), json.loads(ref.stdout)
    assert got["events"] == want["events"] == expected
    assert got.pop("warnings") == [_warning(bad, block)] and want.pop("warnings") == []
    got.pop("file"), want.pop("file")
    assert got == want
    assert p.stderr.splitlines() == [f"kvmtrace replay: warning: {_warning(bad, block)}"]
    text = run("replay", "--skip-damaged", str(bad))
    assert text.returncode == ref.returncode
    assert f"kvmtrace replay: warning: {_warning(bad, block)}" in text.stderr.splitlines()


def test_export_top_and_compare_skip_it_too(damaged, tmp_path: Path) -> None:
    """export --parquet: one row per event of the sound blocks; top -b --json --replay:
    the same intervals as for the file without the block; compare against that file: no
    regression (the same events). Each says the skip once on stderr."""
    import pyarrow.parquet as pq

    bad, cut, block, expected = damaged
    warn = _warning(bad, block)
    out = tmp_path / "x.parquet"
    p = run("export", str(bad), "--parquet", str(out), "--skip-damaged")
    assert p.returncode == 0, p.stderr
    assert pq.ParquetFile(out).metadata.num_rows == expected
    assert f"kvmtrace export: warning: {warn}" in p.stderr.splitlines()
    top = ["top", "-b", "--json", "-d", "0.05", "--replay"]
    p, ref = run(*top, str(bad), "--skip-damaged"), run(*top, str(cut))
    assert p.returncode == ref.returncode == 0, p.stderr
    assert p.stdout == ref.stdout and p.stdout
    assert p.stderr.splitlines() == [f"kvmtrace top: warning: {warn}"]
    p = run("compare", str(cut), str(bad), "--skip-damaged", "--json")
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [f"kvmtrace compare: warning: {warn}"]


def test_skip_damaged_only_with_replay_in_top() -> None:
    p = run("top", "-b", "--skip-damaged")
    assert p.returncode == 2
    assert p.stderr.strip() == ("kvmtrace top: error: --skip-damaged only applies to --replay "
                                "(fix: give --replay FILE, or drop --skip-damaged)")


def test_two_damaged_blocks_and_garbage_between_blocks(tmp_path: Path) -> None:
    """No kernel needed: a written recording of 40 blocks; block 10's payload flipped,
    block 25's sync word gone, and 1000 bytes of junk holding a false sync word inserted
    before block 30. With the flag every other block's events are read (their declared
    counts, from the headers), the events themselves equal to those written, and the
    warning lists the three skips with their offsets and lengths in the damaged file (the
    events a skipped block declared: only where its header is whole)."""
    from kvmtrace.source.recording import open_recording

    ev = synthetic(40 * 500, vcpus=2, seed=5)
    path = tmp_path / "w.kvt"
    with RecordingWriter(path, META) as w:
        for a in range(0, len(ev), 500):
            w.write(ev[a:a + 500])
            w.flush()
    data = path.read_bytes()
    blocks = [b for b in block_table(data) if b[1] == EVENTS]
    assert len(blocks) == 40 and all(b[3] == 500 for b in blocks)
    junk = b"\x01" * 300 + b"KTBK" + b"\x02" * 696
    b10, b25, b30 = blocks[10], blocks[25], blocks[30]
    bad = bytearray(damage(damage(data, b10, "payload"), b25, "header"))
    bad[b30[0]:b30[0]] = junk
    p = tmp_path / "bad.kvt"
    p.write_bytes(bytes(bad))
    with pytest.raises(UsageError, match=f"no block sync word at byte {b25[0]}"):
        open_recording(p).read_all()
    rec = open_recording(p, skip_damaged=True)
    assert rec.events == 38 * 500
    got = rec.read_all()
    keep = np.ones(len(ev), bool)
    for i in (10, 25):
        keep[i * 500:(i + 1) * 500] = False
    assert np.array_equal(got, ev[keep])
    assert rec.skipped == [(b10[0], b10[2], 500), (b25[0], b25[2], 0), (b30[0], 1000, 0)]
    assert rec.warnings == [
        f"{p}: skipped 3 damaged blocks ({b10[2] + b25[2] + 1000} bytes) at bytes "
        f"{b10[0]} ({b10[2]} bytes), {b25[0]} ({b25[2]} bytes), {b30[0]} (1000 bytes) "
        "(--skip-damaged); read the rest"]


def test_a_column_base_out_of_range_is_a_malformed_block() -> None:
    """A case tools/fuzz_readers.py found (tests/data/fuzz): an EVENTS block whose CRC
    holds but whose u32 column declares a base of 30064771073. Without the flag: exit 2,
    one line naming the block's offset (it was an OverflowError traceback); with it: the
    block is skipped (its 500 bytes, from the file's own header) and the rest replayed."""
    path = Path(__file__).parent / "data" / "fuzz" / "column-base-overflow.kvt"
    off, _, length, _ = next(b for b in block_table(path.read_bytes()) if b[0] == 271)
    p = run("replay", str(path))
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert (f"block at byte {off}: malformed EVENTS block: column base 30064771073 out of "
            "range of uint32") in p.stderr
    p = run("replay", str(path), "--skip-damaged")
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines()[0] == (f"kvmtrace replay: warning: {path}: skipped 1 "
                                        f"damaged block ({length} bytes) at byte {off} "
                                        "(--skip-damaged); read the rest")
