#!/usr/bin/env python3
"""Benchmark of the recording format: bytes per event, encode and decode events/s, RSS.

    .venv/bin/python tools/bench_format.py [--events N] [--big N]

Streams measured:
  seq      workload-like: vCPUs push dirty_index +1 per ring, sequential offsets, ts steps
           of ~10 us with jitter, soft-full exits, stalls and periodic resets of every ring;
  random   the same with random offsets (a random-access guest);
  samples  the real kernel text in tests/data/samples, parsed crudely here.
``--big N`` also writes and replays an N-event file, reporting the reader's peak RSS.
The seq and random streams are :func:`kvmtrace.testing.synth.workload_stream`.
"""

from __future__ import annotations

import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, parser

from kvmtrace.core.events import EVENT_DTYPE, Kind
from kvmtrace.core.sources import SourceMeta
from kvmtrace.source.recording import RecordingWriter, open_recording
from kvmtrace.testing.synth import workload_stream

SAMPLES = ROOT / "tests" / "data" / "samples"


_FIELDS = (r"(?: ring (\d+): dirty 0x([0-9a-f]+) reset 0x([0-9a-f]+)"
           r"(?: slot (\d+) offset 0x([0-9a-f]+))?)?")
_FTRACE = re.compile(
    r"^\s*\S+-(\d+)\s+\[\d+\].*?\s(\d+)\.(\d+):\s+(?:kvm:)?kvm_dirty_ring_(push|reset|exit):"
    + _FIELDS
)
_PERF = re.compile(
    r"^\s*\S+\s+(\d+)\s+\[\d+\]\s+(\d+)\.(\d+):\s+kvm:kvm_dirty_ring_(push|reset|exit):"
    + _FIELDS
)


def parse_sample(path: Path) -> np.ndarray:
    """Crude parse of a sample (ftrace ``trace`` or ``perf script`` text) into events."""
    rows = []
    kinds = {"push": Kind.PUSH, "reset": Kind.RESET, "exit": Kind.EXIT}
    for line in path.read_text().splitlines():
        m = _FTRACE.match(line) or _PERF.match(line)
        if not m:
            continue
        tid, sec, frac, what, ring, di, ri, slot, off = m.groups()
        ts = int(sec) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])
        rows.append((ts, int(off or "0", 16), 0, int(tid), int(di or "0", 16),
                     int(ri or "0", 16), int(slot or 0), int(ring) if ring else -1, -1,
                     int(kinds[what]), b""))
    return np.array(rows, dtype=EVENT_DTYPE)


def read_timed(path: Path) -> tuple[int, float]:
    """Decode a recording batch by batch: (events, seconds)."""
    rec = open_recording(path)
    t0 = time.perf_counter()
    got = 0
    for batch in rec.batches():
        got += len(batch)
    return got, time.perf_counter() - t0


def measure(name: str, ev: np.ndarray, tmp: Path, repeat: int = 3) -> None:
    path = tmp / f"{name}.kvt"
    best_enc = best_dec = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        with RecordingWriter(path, SourceMeta(kind="bench")) as w:
            w.write(ev)
        best_enc = min(best_enc, time.perf_counter() - t0)
        got, dec = read_timed(path)
        best_dec = min(best_dec, dec)
    assert got == len(ev)
    size = path.stat().st_size
    print(f"{name:<28} {len(ev):>10} events {size / len(ev):6.2f} B/event  "
          f"encode {len(ev) / best_enc / 1e6:6.2f} M/s  decode {len(ev) / best_dec / 1e6:6.1f} M/s"
          f"  (raw 48 B/event: {48 * len(ev) / size:5.1f}x)")


def big(n: int, tmp: Path) -> None:
    path = tmp / "big.kvt"
    chunk = workload_stream(1 << 20, vcpus=4)
    t0 = time.perf_counter()
    with RecordingWriter(path, SourceMeta(kind="bench")) as w:
        written = 0
        while written < n:
            part = chunk[: n - written].copy()
            part["ts"] += np.uint64(written * 2500)  # keep time moving forward
            w.write(part)
            written += len(part)
    enc = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got, dec = read_timed(path)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"big file: {n} events, {path.stat().st_size / 2**20:.0f} MiB "
          f"({path.stat().st_size / n:.2f} B/event), write {n / enc / 1e6:.1f} M/s, "
          f"read {got / dec / 1e6:.1f} M/s, peak RSS {max(rss, rss0) / 1024:.0f} MiB "
          f"(before reading {rss0 / 1024:.0f} MiB)")


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--big", type=int, default=0, help="also write+read a file of N events")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for vcpus in (1, 4):
            for pattern in ("seq", "random"):
                ev = workload_stream(args.events, vcpus=vcpus, pattern=pattern)
                measure(f"{pattern} {vcpus} vCPU", ev, tmp)
        if SAMPLES.is_dir():
            for f in sorted(SAMPLES.glob("*.txt")):
                measure(f.name[:28], parse_sample(f), tmp, repeat=1)
        if args.big:
            big(args.big, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
