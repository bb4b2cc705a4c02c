"""Hostile inputs to the readers (issue 10, item 2): every case of the issue, through the
CLI in a child whose address space is capped at 2 GiB. The expected figures come from the
files themselves (events written, lines in the text), never from the reader."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import kvmtrace_cmd
from fuzzing import BLOCK, _blocks, _recrc, _replace_payload, _shift_ts

from kvmtrace.core.sources import SourceMeta
from kvmtrace.source.recording import RecordingWriter, open_recording

DATA = Path(__file__).parent / "data"
OLD = next((DATA / "recordings").glob("*.kvt"))
FTRACE = next((DATA / "samples").glob("ftrace-*.txt"))
PERF = next((DATA / "samples").glob("perf-script-*.txt"))
CAP = 2 << 30


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def run(*args: str, stdin: bytes | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run(kvmtrace_cmd(*args), input=stdin.decode("latin-1") if stdin
                          else None, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_cap, env=env)


def one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def events() -> np.ndarray:
    return open_recording(OLD).read_all()


def write(path: Path, ev: np.ndarray, per_block: int = 300) -> bytes:
    with RecordingWriter(path, SourceMeta(kind="t", start_time=1.5)) as w:
        for a in range(0, len(ev), per_block):
            w.write(ev[a:a + per_block])
            w.flush()
    return path.read_bytes()


def kinds(data: bytes) -> list[int]:
    return [data[p + 4] for p, _ in _blocks(data)]


def set_field(data: bytes, block: int, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, _blocks(data)[block][0] + off, value)
    _recrc(b)
    return bytes(b)


def each_command(path: Path, tmp: Path, every: bool = False
                 ) -> list[subprocess.CompletedProcess[str]]:
    """replay; with ``every``, also top -b --replay, export and compare."""
    out = [run("replay", str(path))]
    if every:
        out += [run("top", "-b", "--replay", str(path)),
                run("export", str(path), "--parquet", str(tmp / "o.parquet")),
                run("compare", str(path), str(OLD))]
    return out


def test_event_count_above_the_format_limit(tmp_path: Path, events: np.ndarray) -> None:
    data = write(tmp_path / "a.kvt", events[:50])
    ev_block = kinds(data).index(2)
    pos = _blocks(data)[ev_block][0]
    bad = tmp_path / "count.kvt"
    bad.write_bytes(set_field(data, ev_block, 16, "<I", 1 << 29))
    assert len(bad.read_bytes()) < 4096
    for r in each_command(bad, tmp_path, every=True):
        one_line_error(r, f"at byte {pos}", "65536")


def test_zlib_bomb(tmp_path: Path, events: np.ndarray) -> None:
    data = write(tmp_path / "a.kvt", events[:50])
    meta = kinds(data).index(1)
    bomb = _replace_payload(data, meta, b"\0" * (200 << 20), 1, True)  # 200 MiB of zeros
    b = bytearray(bomb)
    _recrc(b)
    path = tmp_path / "bomb.kvt"
    path.write_bytes(bytes(b))
    assert len(b) < 400_000
    one_line_error(run("replay", str(path)), "META", f"at byte {_blocks(data)[meta][0]}")
    # a bomb that declares a small size: inflation stops past the declared size
    b = bytearray(bomb)
    struct.pack_into("<I", b, _blocks(bomb)[meta][0] + 12, 1000)
    _recrc(b)
    path.write_bytes(bytes(b))
    for r in each_command(path, tmp_path, every=True):
        one_line_error(r, "META", "1000 bytes declared", f"at byte {_blocks(data)[meta][0]}")
    # an EVENTS stream that inflates beyond what its block may hold
    ev_block = kinds(data).index(2)
    big = _replace_payload(data, ev_block, b"\0" * (50 << 20), 2, True)
    b = bytearray(big)
    _recrc(b)
    path.write_bytes(bytes(b))
    one_line_error(run("replay", str(path)), f"at byte {_blocks(data)[ev_block][0]}")


HOSTILE = [
    (1, {"kind": "t", "ring_entries": [[1, 2, 1 << 40]]}, "ring size"),
    (1, {"kind": "t", "ring_entries": [[1, 2, 10**400]]}, "META"),
    (1, {"kind": "t", "start_time": "yesterday"}, "start_time"),
    (4, {"events": 50, "lost": "7"}, "lost"),
    (4, {"events": 50, "lost": [1]}, "lost"),
    (4, {"events": 50, "lost": -1}, "lost"),
]


@pytest.mark.parametrize("btype,doc,word", HOSTILE)
def test_malformed_json_blocks(tmp_path: Path, events: np.ndarray, btype: int, doc: dict,
                               word: str) -> None:
    data = write(tmp_path / "a.kvt", events[:50])
    i = kinds(data).index(btype)
    raw = json.dumps(doc).encode() if "10" not in word else b""
    if btype == 1 and doc.get("ring_entries") == [[1, 2, 10**400]]:
        raw = b'{"kind": "t", "ring_entries": [[1, 2, 1' + b"0" * 400 + b']]}'
    b = bytearray(_replace_payload(data, i, raw, btype, btype == 1))
    _recrc(b)
    path = tmp_path / "j.kvt"
    path.write_bytes(bytes(b))
    for r in each_command(path, tmp_path, every=btype == 4):
        one_line_error(r, word, f"at byte {_blocks(data)[i][0]}")


@pytest.mark.parametrize("raw", [b'{"events": 50, "lost": NaN}', b"[" * 100_000 + b"]" * 100_000,
                                 b'"a string"'])
def test_nan_deep_and_non_object_json(tmp_path: Path, events: np.ndarray, raw: bytes) -> None:
    data = write(tmp_path / "a.kvt", events[:50])
    i = kinds(data).index(4)
    b = bytearray(_replace_payload(data, i, raw, 4))
    _recrc(b)
    path = tmp_path / "j.kvt"
    path.write_bytes(bytes(b))
    one_line_error(run("replay", str(path)), "END", f"at byte {_blocks(data)[i][0]}")


def test_three_byte_lost_block(tmp_path: Path, events: np.ndarray) -> None:
    with RecordingWriter(tmp_path / "a.kvt", SourceMeta(kind="t")) as w:
        w.write(events[:50])
        w.add_lost(3)
    data = (tmp_path / "a.kvt").read_bytes()
    i = kinds(data).index(3)
    b = bytearray(_replace_payload(data, i, b"\1\2\3", 3))
    _recrc(b)
    path = tmp_path / "l.kvt"
    path.write_bytes(bytes(b))
    one_line_error(run("replay", str(path)), "LOST", f"at byte {_blocks(data)[i][0]}")


@pytest.mark.parametrize("what,off,fmt,value", [
    ("no block sync word", 0, "<4s", b"XXXX"),
    ("unknown block type 9", 4, "<B", 9),
])
def test_damage_mid_file_is_a_format_error(tmp_path: Path, events: np.ndarray, what: str,
                                           off: int, fmt: str, value: object) -> None:
    data = write(tmp_path / "a.kvt", events, per_block=200)
    blocks = _blocks(data)
    i = len(blocks) // 2
    b = bytearray(data)
    struct.pack_into(fmt, b, blocks[i][0] + off, value)
    path = tmp_path / "d.kvt"
    path.write_bytes(bytes(b))
    for r in each_command(path, tmp_path):
        one_line_error(r, what, f"at byte {blocks[i][0]}")


def test_torn_tail_still_a_killed_writer(tmp_path: Path, events: np.ndarray) -> None:
    data = write(tmp_path / "a.kvt", events, per_block=200)
    last = _blocks(data)[-2]  # the last EVENTS block, before END
    cut = tmp_path / "cut.kvt"
    cut.write_bytes(data[:last[0] + BLOCK.size + 5])
    rec = open_recording(cut)
    assert rec.truncated and rec.torn_bytes == BLOCK.size + 5
    assert rec.events == len(events) - (len(events) - 1) % 200 - 1
    zeros = tmp_path / "zeros.kvt"  # a power loss: the tail's blocks never reached the disk
    zeros.write_bytes(data[:last[0]] + b"\0" * 4096)
    rec = open_recording(zeros)
    assert rec.truncated and rec.torn_bytes == 4096


@pytest.mark.parametrize("tail", ["self", "garbage"])
def test_data_after_end_is_said(tmp_path: Path, events: np.ndarray, tail: str) -> None:
    data = write(tmp_path / "a.kvt", events[:100])
    extra = data if tail == "self" else b"\x01garbage" * 10
    path = tmp_path / "two.kvt"
    path.write_bytes(data + extra)
    r = run("replay", str(path))
    assert r.returncode in (0, 1), r.stderr
    want = (f"{len(extra)} bytes after the END block, from byte {len(data)}"
            f" ({'another recording' if tail == 'self' else 'data that is not part'}")
    assert want in r.stderr.replace("\n  ", " "), r.stderr
    assert "source recording, 100 events" in r.stdout


def test_timestamp_jump_and_2_63(tmp_path: Path, events: np.ndarray) -> None:
    ev = events.copy()
    ev["ts"][-1] = 1 << 63
    path = tmp_path / "big.kvt"
    write(path, ev)
    pushes = int((ev["kind"] == 1).sum())
    for args in (("replay",), ("replay", "--window", "0.001"), ("top", "-b", "--replay")):
        r = run(*args, str(path), timeout=60)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    r = run("replay", "--json", str(path))
    doc = json.loads(r.stdout)
    assert sum(x["pushes"] for x in doc["rings"]) == pushes


def _jumped_text(tmp_path: Path) -> tuple[Path, list[bytes]]:
    lines = FTRACE.read_bytes().splitlines(True)
    push = [i for i, x in enumerate(lines) if b"kvm_dirty_ring_push" in x]
    lines[push[1]] = lines[push[1]].replace(b" 6156.", b" 100006156.")
    text = lines[:push[3]]
    path = tmp_path / "jump.txt"
    path.write_bytes(b"".join(text))
    return path, text


def test_ftrace_timestamp_jump(tmp_path: Path) -> None:
    path, text = _jumped_text(tmp_path)
    pushes = sum(b"kvm_dirty_ring_push" in x for x in text)
    r = run("replay", "--json", str(path), timeout=60)
    doc = json.loads(r.stdout)
    assert sum(x["pushes"] for x in doc["rings"]) == pushes == 3
    r = run("top", "-b", "--json", "--replay", str(path), timeout=60)
    frames = [json.loads(x) for x in r.stdout.splitlines()]
    # the push at t0, one empty second kept before the jump, the pushes 1e8 s later
    assert len(frames) == 3, r.stdout[:500]


def test_smallest_window_over_a_long_trace(tmp_path: Path) -> None:
    """--window 0.001 (the smallest the flag takes) over a trace spanning 1e5 s: one window
    per millisecond that holds a push, as the text has them (not 1e8 windows)."""
    lines = FTRACE.read_bytes().splitlines(True)
    half = len(lines) // 2
    lines[half:] = [_shift_ts(x, 100_000) for x in lines[half:]]
    path = tmp_path / "span.txt"
    path.write_bytes(b"".join(lines))
    stamps: Counter[int] = Counter()
    for x in lines:
        if b"kvm_dirty_ring_push" in x:
            sec, frac = x.split(b": kvm_dirty_ring_push")[0].split()[-1].split(b".")
            stamps[int(sec) * 10**9 + int(frac.ljust(9, b"0"))] += 1
    t0 = min(stamps)
    assert max(stamps) - t0 > 100_000 * 10**9
    per_ms: Counter[int] = Counter()
    for t, n in stamps.items():
        per_ms[(t - t0) // 10**6] += n
    r = run("replay", "--json", "--window", "0.001", str(path), timeout=60)
    assert r.returncode in (0, 1), r.stderr
    (ring,) = json.loads(r.stdout)["workingset"]["rings"]
    assert [w[:2] for w in ring["windows"]] == [[w, n] for w, n in sorted(per_ms.items())]


def test_mixed_text_lines_are_counted(tmp_path: Path) -> None:
    ftrace, perf = FTRACE.read_bytes(), PERF.read_bytes()
    path = tmp_path / "mixed.txt"
    path.write_bytes(ftrace + perf)
    perf_lines = perf.count(b"kvm:kvm_dirty_ring_")
    r = run("replay", str(path))
    assert (f"{perf_lines} dirty-ring lines in perf script format in a tracefs trace "
            "were skipped") in r.stderr.replace("\n  ", " "), r.stderr


def test_unparseable_lines_are_counted(tmp_path: Path) -> None:
    lines = FTRACE.read_bytes().splitlines(True)
    push = [i for i, x in enumerate(lines) if b"kvm_dirty_ring_push" in x]
    for i in push[:7]:
        lines[i] = lines[i].replace(b"offset 0x", b"offset 0xzz")
    path = tmp_path / "bad.txt"
    path.write_bytes(b"".join(lines))
    r = run("replay", str(path))
    assert "7 lines naming a dirty-ring event could not be parsed" in \
        r.stderr.replace("\n  ", " "), r.stderr


def test_recording_on_stdin_and_text_from_a_fifo(tmp_path: Path) -> None:
    want = run("replay", "--json", str(OLD))
    r = subprocess.run(kvmtrace_cmd("replay", "--json", "-"), stdin=OLD.open("rb"),
                       capture_output=True, timeout=60)
    assert r.returncode == want.returncode and json.loads(r.stdout)["rings"] == \
        json.loads(want.stdout)["rings"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    want = run("replay", "--json", str(FTRACE))
    child = subprocess.Popen(kvmtrace_cmd("replay", "--json", str(fifo)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(fifo, "wb") as f:
        f.write(FTRACE.read_bytes())
    out, _ = child.communicate(timeout=60)
    assert child.returncode == want.returncode
    assert json.loads(out)["rings"] == json.loads(want.stdout)["rings"]


def test_crc_checked_bytes_unchanged() -> None:
    """The helpers fix CRCs the way the format defines them (zlib CRC-32 of the header's
    first 36 bytes, then the payload): the old file's blocks verify."""
    data = OLD.read_bytes()
    for pos, end in _blocks(data):
        crc = struct.unpack_from("<I", data, pos + BLOCK.size - 4)[0]
        assert crc == zlib.crc32(data[pos + BLOCK.size:end],
                                 zlib.crc32(data[pos:pos + BLOCK.size - 4]))
