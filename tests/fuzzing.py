"""Property-based fuzzing of kvmtrace's readers (issue 10, item 3), shared by
tests/test_fuzz_readers.py (a CI-sized run) and tools/fuzz_readers.py (the long run).

Inputs are hostile variants of real inputs, drawn with hypothesis:

- ``recording``: the old v1.0 file of tests/data/recordings and freshly encoded streams,
  mutated by structure (block header fields set to edge values, blocks dropped, repeated
  or cut, META/END/LOST payloads replaced by hostile JSON or bytes, bytes flipped, data
  appended), with the block CRCs made right again or not;
- ``recording-skip``: the same recordings, every command with ``--skip-damaged``;
- ``ftrace`` and ``perf-script``: the shared text samples of tests/data/samples, mutated by
  line (dropped, repeated, cut, numbers replaced by edge values, timestamps jumped by up
  to 1e8 s, the other format's lines and junk mixed in).
- ``bundle``: the ``bundle.json`` of a ``kvmtrace bench`` bundle (beside one sound
  recording), as ``compare`` reads it: fields of every JSON type, hostile names, deep
  nesting, NaN, huge numbers, raw bytes.

Each case runs a kvmtrace command (replay, replay --json, top -b --replay, export;
compare for a bundle) on the file in a worker process whose address space is capped
(``RLIMIT_AS``) and each case has a time limit. The property: the command returns 0 or 1
(a replay of what is sound; what was skipped is said in a warning), or 2 with a one-line
error; never a traceback, never more than the time limit, never more memory than the cap.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import select
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
BLOCK = struct.Struct("<4sBBHIIIQQI")
FILE_HEADER = 16
READERS = ("recording", "recording-skip", "ftrace", "perf-script", "bundle")
AS_CAP = 3 << 30  #: address-space cap of the worker (bytes)
CASE_SECONDS = 20.0  #: time limit of one case

__all__ = ["READERS", "Worker", "Outcome", "Tally", "case_strategy", "miscount_block", "seeds",
           "spoil_block"]

# --- the worker ----------------------------------------------------------------------------

_WORKER = r"""
import contextlib, io, json, resource, signal, sys, time, traceback
from kvmtrace.cli import main

class Hang(BaseException):
    pass

def alarm(*_):
    raise Hang()

signal.signal(signal.SIGALRM, alarm)
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    err = io.StringIO()
    tb = None
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, req["seconds"])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(req["argv"])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 2
    except Hang:
        rc, tb = -1, "timeout"
    except BaseException:
        rc, tb = -2, traceback.format_exc()[-2000:]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what a command set, undone
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGALRM, alarm)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rc": rc, "err": err.getvalue()[-2000:], "tb": tb,
                      "secs": time.monotonic() - t0, "rss_kib": rss}), flush=True)
"""


@dataclass
class Outcome:
    """One case's result: ``rc`` (-1 time limit, -2 traceback, -3 worker died),
    ``err`` (stderr), ``tb`` (the traceback, if any), ``secs``, worker peak RSS."""

    rc: int
    err: str
    tb: str | None
    secs: float
    rss_kib: int

    def problem(self) -> str | None:
        """None if the property holds, else what broke."""
        if self.rc == -1:
            return "no answer within the time limit"
        if self.rc in (-2, -3):
            return f"traceback or crash: {(self.tb or self.err)[-600:]}"
        if "Traceback" in self.err:
            return f"traceback on stderr: {self.err[-600:]}"
        if self.rc == 2:  # one error line (warnings said before it are not errors)
            lines = [x for x in self.err.splitlines()
                     if x.strip() and ": warning:" not in x and not x.startswith(" ")]
            if len(lines) != 1 or ": error:" not in lines[0]:
                return f"exit 2 with {len(lines)} lines: {self.err[-600:]}"
            return None
        if self.rc not in (0, 1):
            return f"exit {self.rc}: {self.err[-600:]}"
        return None


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_CAP, AS_CAP))


class Worker:
    """A child Python running kvmtrace's CLI in-process, case after case, under
    :data:`AS_CAP`; restarted when a case kills or wedges it."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.peak_rss_kib = 0

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1",
                   OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=env, preexec_fn=_cap)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("fuzz worker did not start")
        return proc

    def run(self, argv: list[str], seconds: float = CASE_SECONDS) -> Outcome:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        assert proc.stdin and proc.stdout
        t0 = time.monotonic()
        proc.stdin.write(json.dumps({"argv": argv, "seconds": seconds}) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], seconds + 10)
        line = proc.stdout.readline() if ready else ""
        if not line:  # wedged in C code past the alarm, or killed (the cap, a signal)
            proc.kill()
            proc.wait()
            self.proc = None
            return Outcome(-1 if not ready else -3, "", "worker died or wedged",
                           time.monotonic() - t0, 0)
        d = json.loads(line)
        self.peak_rss_kib = max(self.peak_rss_kib, d["rss_kib"])
        return Outcome(d["rc"], d["err"], d["tb"], d["secs"], d["rss_kib"])

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@dataclass
class Tally:
    """Cases run per reader, problems found, worst time."""

    cases: dict[str, int] = field(default_factory=dict)
    exits: dict[str, dict[int, int]] = field(default_factory=dict)
    problems: list[tuple[str, list[str], str, bytes]] = field(default_factory=list)
    worst_secs: float = 0.0

    def add(self, reader: str, argv: list[str], out: Outcome, data: bytes) -> str | None:
        self.cases[reader] = self.cases.get(reader, 0) + 1
        ex = self.exits.setdefault(reader, {})
        ex[out.rc] = ex.get(out.rc, 0) + 1
        self.worst_secs = max(self.worst_secs, out.secs)
        bad = out.problem()
        if bad:
            self.problems.append((reader, argv, bad, data))
        return bad


# --- seeds ---------------------------------------------------------------------------------


def _fresh_recordings() -> list[bytes]:
    """Freshly encoded recordings: slices of the old file's events, re-written by this
    checkout's writer (several blocks, a LOST block, a META update, an END block), and
    one whose writer was killed (no END)."""
    sys.path.insert(0, str(ROOT))
    from kvmtrace.core.sources import SourceMeta
    from kvmtrace.source.recording import RecordingWriter, open_recording

    ev = open_recording(next((DATA / "recordings").glob("*.kvt"))).read_all()
    out = []
    with tempfile.TemporaryDirectory() as d:
        for i, (n, per_block) in enumerate(((len(ev), 300), (200, 64), (50, 50))):
            p = Path(d) / f"{i}.kvt"
            w = RecordingWriter(p, SourceMeta(kind="fuzz", host="h", start_time=1.5,
                                              ring_entries={(-1, -1): 256}))
            for a in range(0, n, per_block):
                w.write(ev[a:a + per_block])
                w.flush()
                w.add_lost(1)
            w.update_meta(ring_entries={(1, 2): 512})
            if i < 2:
                w.close()
            else:  # killed writer: no END block
                w.flush()
                os.close(w._fd)  # noqa: SLF001 (a killed writer leaves its file so)
                w._fd = None  # noqa: SLF001
                p = w.temp  # a killed writer's file is still NAME.PID.partial
            out.append(p.read_bytes())
    return out


_SEEDS: dict[str, list[bytes]] = {}


def seeds(reader: str) -> list[bytes]:
    """Real inputs of ``reader``'s format to mutate."""
    if reader not in _SEEDS:
        if reader == "recording":
            old = [p.read_bytes() for p in sorted((DATA / "recordings").glob("*.kvt"))]
            _SEEDS[reader] = old + _fresh_recordings()
        else:
            name = "ftrace-*.txt" if reader == "ftrace" else "perf-script-*.txt"
            text = next((DATA / "samples").glob(name)).read_bytes()
            lines = text.splitlines(True)
            _SEEDS[reader] = [text, b"".join(lines[:300]), b"".join(lines[-120:])]
    return _SEEDS[reader]


# --- mutations -----------------------------------------------------------------------------

EDGE_U32 = [0, 1, 2, 255, 256, 4096, 65535, 65536, 65537, 1 << 24, (1 << 28) + 1,
            (1 << 31) - 1, 1 << 31, (1 << 32) - 1]
EDGE_U64 = [0, 1, 1 << 32, 10**17, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
HOSTILE_JSON: list[Any] = [
    {"lost": "7"}, {"lost": float("nan")}, {"lost": [1]}, {"lost": -1}, {"lost": 10**400},
    {"events": 1 << 70}, {"ts_first": "x"}, {"ring_entries": [[1, 2, 1 << 40]]},
    {"ring_entries": [[1, 2, 10**400]]}, {"ring_entries": [[1, 2]]}, {"ring_entries": 5},
    {"ring_entries": [[1, 2, 300]]}, {"start_time": "yesterday"}, {"hooks": []},
    {"vms": [{"pid": "x"}]}, {"vms": "no"}, {"extra": 3}, {"kind": 7},
    {"tracepoint_formats": {"a": 1}}, [], "string", 12,
]


def _blocks(data: bytes) -> list[tuple[int, int]]:
    """(offset, end) of each whole block."""
    out, pos = [], FILE_HEADER
    while pos + BLOCK.size <= len(data):
        f = BLOCK.unpack_from(data, pos)
        end = pos + BLOCK.size + f[4]
        if f[0] != b"KTBK" or end > len(data):
            break
        out.append((pos, end))
        pos = end
    return out


def _recrc(data: bytearray) -> None:
    """Make every block's CRC right again (so mutations reach the decoders)."""
    for pos, end in _blocks(bytes(data)):
        head = bytes(data[pos:pos + BLOCK.size - 4])
        crc = zlib.crc32(bytes(data[pos + BLOCK.size:end]), zlib.crc32(head))
        struct.pack_into("<I", data, pos + BLOCK.size - 4, crc)


def spoil_block(path: Path, off: int) -> None:
    """Flip a byte of the stored payload of the block at ``off`` of recording ``path``: its
    CRC no longer matches."""
    data = bytearray(path.read_bytes())
    data[off + BLOCK.size + 20] ^= 0xFF
    path.write_bytes(bytes(data))


def miscount_block(path: Path, off: int, less: int) -> int:
    """Make the header of the block at ``off`` of recording ``path`` declare ``less``
    events fewer than its payload holds, CRC made right again (the decoder meets the
    mismatch itself); returns the count it declared before."""
    data = bytearray(path.read_bytes())
    head = list(BLOCK.unpack_from(data, off))
    count = head[6]
    head[6] = count - less
    BLOCK.pack_into(data, off, *head)
    _recrc(data)
    path.write_bytes(bytes(data))
    return count


@functools.lru_cache(maxsize=8)
def _bomb(size: int) -> bytes:
    """``size`` zero bytes, deflated (about 1/1000 of that)."""
    return zlib.compress(b"\0" * size, 9)


def _replace_payload(data: bytes, idx: int, payload: bytes, btype: int | None = None,
                     zlib_codec: bool = False, bomb: int = 0) -> bytes:
    """Block ``idx``'s payload replaced (``bomb``: by that many zeros, deflated)."""
    blocks = _blocks(data)
    if not blocks:
        return data
    pos, end = blocks[idx % len(blocks)]
    f = list(BLOCK.unpack_from(data, pos))
    stored = _bomb(bomb) if bomb else zlib.compress(payload) if zlib_codec else payload
    f[1] = f[1] if btype is None else btype
    f[2], f[4], f[5] = int(zlib_codec or bomb > 0), len(stored), bomb or len(payload)
    return data[:pos] + BLOCK.pack(*f) + stored + data[end:]


@st.composite
def _recording_case(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(seeds("recording")))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["field", "field", "flip", "cut", "append", "drop",
                                   "repeat", "json", "lost", "bomb", "payload"]))
        blocks = _blocks(data)
        bi = draw(st.integers(0, max(len(blocks) - 1, 0)))
        if op == "field" and blocks:
            pos = blocks[bi][0]
            name, fmt, off = draw(st.sampled_from(
                [("type", "<B", 4), ("codec", "<B", 5), ("stored", "<I", 8),
                 ("raw", "<I", 12), ("count", "<I", 16), ("ts_min", "<Q", 20),
                 ("ts_max", "<Q", 28), ("sync", "<I", 0)]))
            val = draw(st.sampled_from(EDGE_U64 if fmt == "<Q" else
                                       [0, 1, 2, 3, 4, 5, 9, 255] if fmt == "<B" else EDGE_U32))
            b = bytearray(data)
            struct.pack_into(fmt, b, pos + off, val % (1 << (8 * struct.calcsize(fmt))))
            data = bytes(b)
        elif op == "flip" and len(data) > 16:
            b = bytearray(data)
            for _ in range(draw(st.integers(1, 8))):
                b[draw(st.integers(16, len(b) - 1))] ^= draw(st.integers(1, 255))
            data = bytes(b)
        elif op == "cut":
            data = data[:draw(st.integers(0, len(data)))]
        elif op == "append":
            data = data + draw(st.sampled_from([data, data[16:], b"\0" * 64, b"KTBK",
                                                draw(st.binary(max_size=200))]))
        elif op == "drop" and blocks:
            pos, end = blocks[bi]
            data = data[:pos] + data[end:]
        elif op == "repeat" and blocks:
            pos, end = blocks[bi]
            data = data[:end] + data[pos:end] * draw(st.integers(1, 3)) + data[end:]
        elif op == "json" and blocks:
            js = draw(st.sampled_from(HOSTILE_JSON + ["deep", "nan"]))
            raw = (b"[" * 100_000 + b"]" * 100_000 if js == "deep"
                   else b'{"lost": NaN}' if js == "nan" else json.dumps(js).encode())
            data = _replace_payload(data, bi, raw, draw(st.sampled_from([1, 4])),
                                    draw(st.booleans()))
        elif op == "lost" and blocks:
            data = _replace_payload(data, bi, draw(st.binary(max_size=12)), 3)
        elif op == "bomb" and blocks:
            size = draw(st.sampled_from([1 << 20, 1 << 26]))
            data = _replace_payload(data, bi, b"", draw(st.sampled_from([1, 2, 4])),
                                    bomb=size)
        elif op == "payload" and blocks:  # bytes inside one EVENTS payload
            pos, end = blocks[bi]
            if end > pos + BLOCK.size:
                b = bytearray(data)
                at = draw(st.integers(pos + BLOCK.size, end - 1))
                b[at] = draw(st.sampled_from([0, 1, 2, 7, 8, 63, 64, 65, 128, 255]))
                data = bytes(b)
    if draw(st.integers(0, 9)) < 8:
        b = bytearray(data)
        _recrc(b)
        data = bytes(b)
    return data


_TEXT_JUNK = [
    b"\0\0\0\n", b"\xff\xfe garbage\n", b"# tracer: nop\n", b"CPU:0 [LOST 12 EVENTS]\n",
    b"kvm_dirty_ring_push: ring\n", b" kvm:kvm_dirty_ring_push: ring 0: dirty 0x\n",
    b"x-1 [000] 1.0: kvm_dirty_ring_push: ring 99999999999999999999: dirty 0x1 reset 0x0 "
    b"slot 0 offset 0x1 (used 1)\n",
    b"x-1 [000] 99999999999999999999.999999: kvm_dirty_ring_reset: ring 0: dirty 0x1 "
    b"reset 0x1 (used 0)\n",
    b"q 5 [001] 1.000001: kvm:kvm_dirty_ring_exit: vcpu 4294967295\n",
]


@st.composite
def _text_case(draw: st.DrawFn, reader: str) -> bytes:
    lines = draw(st.sampled_from(seeds(reader))).splitlines(True)
    other = seeds("perf-script" if reader == "ftrace" else "ftrace")[2].splitlines(True)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["drop", "repeat", "cut", "number", "jump", "other",
                                   "junk", "swap", "bytes"]))
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        if op == "drop":
            del lines[i:i + draw(st.integers(1, 50))]
        elif op == "repeat":
            lines[i:i] = lines[i:i + draw(st.integers(1, 20))] * draw(st.integers(1, 3))
        elif op == "cut":
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        elif op == "number":
            digits = [k for k, c in enumerate(lines[i]) if 48 <= c <= 57]
            if digits:
                k = draw(st.sampled_from(digits))
                rep = draw(st.sampled_from([b"0", b"9" * 12, b"9" * 25, b"18446744073709551616",
                                            b"-1", b"", b"x"]))
                lines[i] = lines[i][:k] + rep + lines[i][k + 1:]
        elif op == "jump":  # a timestamp jumps by up to 1e8 s from here on
            add = draw(st.sampled_from([1, 1000, 10**8]))
            for j in range(i, min(len(lines), i + draw(st.integers(1, 400)))):
                lines[j] = _shift_ts(lines[j], add)
        elif op == "other":
            lines[i:i] = other[:draw(st.integers(1, 60))]
        elif op == "junk":
            lines.insert(i, draw(st.sampled_from(_TEXT_JUNK)))
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "bytes":
            lines.insert(i, draw(st.binary(max_size=120)))
    return b"".join(lines)


def _shift_ts(line: bytes, add: int) -> bytes:
    k = line.find(b": kvm")
    dot = line.rfind(b".", 0, k)
    if k < 0 or dot < 0:
        return line
    s = dot
    while s > 0 and 48 <= line[s - 1] <= 57:
        s -= 1
    if s == dot:
        return line
    return line[:s] + str(int(line[s:dot]) + add).encode() + line[dot:]


COMMANDS = {
    "replay": ["replay", "{f}"],
    "replay-json": ["replay", "--json", "--window", "0.000001", "{f}"],
    "top": ["top", "-b", "--replay", "{f}", "-d", "0.001", "--ring-entries", "512"],
    "export": ["export", "{f}", "--parquet", "{o}"],
}
#: reader ``recording-skip``: the same commands with --skip-damaged (damage skipped and
#: counted instead of exit 2)
SKIP_COMMANDS = {f"{k}-skip": [*v, "--skip-damaged"] for k, v in COMMANDS.items()}


#: reader ``bundle``: the case is a bundle's bundle.json ({d}: its directory)
BUNDLE_COMMANDS = {
    "compare-bundles": ["compare", "{d}", "{d}"],
    "compare-bundle-json": ["compare", "--json", "{d}", "{d}/rep-000.kvt"],
}

_JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
              | st.floats(allow_nan=False) | st.text(max_size=12))
_JSON = st.recursive(_JSON_LEAF, lambda c: st.lists(c, max_size=4)
                     | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=16)
_NAMES = st.sampled_from(["rep-000.kvt", "", ".", "..", "../etc/passwd", "a/b", "x\0y",
                          "missing.kvt", "rep-000.kvt" * 40])


@st.composite
def _bundle_case(draw: st.DrawFn) -> bytes:
    """A hostile bundle.json: a sound one with fields replaced, or raw bytes."""
    meta: dict[str, Any] = {"kind": "kvmtrace-bench", "schema": 1,
                            "recordings": ["rep-000.kvt"], "vmm": "kvmtrace-workload",
                            "preset": "small-ring-heavy", "workload_args": ["--vcpus", "2"],
                            "kernel": {"release": "6.18"}, "cpu_model": "x",
                            "created": "2026-11-29T00:00:00Z"}
    how = draw(st.integers(0, 5))
    if how == 0:
        return draw(st.binary(max_size=300))
    if how == 1:
        n = draw(st.integers(1, 200_000))
        return b'{"kind": "kvmtrace-bench", "recordings": ' + b"[" * n + b"]" * n + b"}"
    for key in draw(st.lists(st.sampled_from(sorted(meta)), max_size=4)):
        meta[key] = draw(_JSON)
    if how == 2:
        meta["recordings"] = draw(st.lists(_NAMES, max_size=5))
    text = json.dumps(meta)
    if how == 3:
        text = text.replace('"schema": 1', draw(st.sampled_from(
            ['"schema": NaN', '"schema": 1e400', '"schema": -Infinity', '"schema": 99'])))
    return text.encode()


def case_strategy(reader: str) -> st.SearchStrategy[tuple[bytes, str]]:
    """(file bytes, command name) cases for ``reader``."""
    if reader == "bundle":
        return st.tuples(_bundle_case(), st.sampled_from(sorted(BUNDLE_COMMANDS)))
    data = _recording_case() if reader.startswith("recording") else _text_case(reader)
    names = SKIP_COMMANDS if reader == "recording-skip" else COMMANDS
    return st.tuples(data, st.sampled_from(sorted(names)))


def case_path(reader: str, work: Path) -> Path:
    """Where a case of ``reader`` is written in ``work``: for ``bundle``, the bundle.json
    of a bundle directory holding one sound recording (rep-000.kvt)."""
    if reader != "bundle":
        return work / f"{reader}.in"
    d = work / "bundle"
    d.mkdir(exist_ok=True)
    rec = d / "rep-000.kvt"
    if not rec.exists():
        rec.write_bytes(next((DATA / "recordings").glob("*.kvt")).read_bytes())
    return d / "bundle.json"


def argv_for(command: str, path: Path, out: Path) -> list[str]:
    table = {**COMMANDS, **SKIP_COMMANDS, **BUNDLE_COMMANDS}
    return [a.format(f=path, o=out, d=path.parent) for a in table[command]]
