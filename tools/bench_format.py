#!/usr/bin/env python3
"""Benchmark of the recording format: bytes per event, encode and decode events/s, RSS.

    .venv/bin/python tools/bench_format.py [--events N] [--big N]

Streams measured:
  seq      workload-like: vCPUs push dirty_index +1 per ring, sequential offsets, ts steps
           of ~10 us with jitter, soft-full exits, stalls and periodic resets of every ring;
  random   the same with random offsets (a random-access guest);
  samples  the real kernel text in tests/data/samples, parsed crudely here.
``--big N`` also writes and replays an N-event file, reporting the reader's peak RSS.
:func:`synthetic` is imported by the tests as ground truth.
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvmtrace.core.events import EVENT_DTYPE, Kind, empty  # noqa: E402
from kvmtrace.core.kvm_abi import bytes_from_entries, soft_limit_of  # noqa: E402
from kvmtrace.core.sources import SourceMeta  # noqa: E402
from kvmtrace.source.recording import RecordingWriter, open_recording  # noqa: E402

SAMPLES = ROOT / "tests" / "data" / "samples"


def synthetic(n: int, vcpus: int = 4, pattern: str = "seq", ring_entries: int = 512,
              pages: int = 1 << 18, seed: int = 1, pid: int = 4321, vm: int = 11,
              period_ns: int = 2_000_000, push_ns: int = 10_000) -> np.ndarray:
    """About ``n`` (at least n, then cut to n) events of a dirty-ring workload, time-ordered.

    Each vCPU pushes every ``push_ns`` on average (80 % fixed, 20 % exponential jitter);
    every 0.5-3 ``period_ns`` the VMM resets all rings (one RESET per ring, one RESET_LAT); a
    vCPU that reaches the soft limit (entries - 64) exits (EXIT) and stalls until that
    reset (STALL at the end of the stall, value = its ns). ``pattern`` "seq" walks pages in
    order per vCPU, "random" picks them at random.
    """
    rng = np.random.default_rng(seed)
    soft = soft_limit_of(ring_entries)
    t = 1_000_000_000
    dirty = [0] * vcpus
    reset = [0] * vcpus
    cursor = [i * (pages // vcpus) for i in range(vcpus)]
    clock = [t + int(rng.integers(0, push_ns)) for _ in range(vcpus)]
    stalled: list[int | None] = [None] * vcpus
    chunks: list[np.ndarray] = []
    head = empty(1)
    head[0] = (t - 1000, bytes_from_entries(ring_entries), pid, pid, 0, 0, 223, -1, vm,
               Kind.RING_SIZE, b"")
    chunks.append(head)
    total = 1
    while total < n:
        t_end = t + int(period_ns * rng.uniform(0.5, 3.0))
        guess = (t_end - t) // push_ns * 2 + 8
        for i in range(vcpus):
            tid = pid + 1 + i
            times = clock[i] + np.cumsum(
                (push_ns * 0.8 + rng.exponential(push_ns * 0.2, guess)).astype(np.int64))
            times = times[times < t_end]
            room = soft - (dirty[i] - reset[i])
            full = len(times) >= room
            k = min(len(times), room)
            times = times[:k]
            ev = empty(k + (1 if full else 0))
            if k:
                ev["ts"][:k] = times
                ev["dirty_index"][:k] = dirty[i] + 1 + np.arange(k)
                ev["reset_index"][:k] = reset[i]
                ev["kind"][:k] = Kind.PUSH
                if pattern == "seq":
                    ev["value"][:k] = (cursor[i] + np.arange(k)) % pages
                    cursor[i] = (cursor[i] + k) % pages
                else:
                    ev["value"][:k] = rng.integers(0, pages, k)
                dirty[i] += k
            if full:
                exit_ts = (int(times[-1]) if k else clock[i]) + 300
                ev[k] = (exit_ts, 0, pid, tid, dirty[i], reset[i], 0, i, vm, Kind.EXIT, b"")
                stalled[i] = exit_ts + 2000
                clock[i] = t_end + 50_000 + int(rng.integers(0, 5000))
            elif k:
                clock[i] = int(times[-1]) + push_ns
            ev["pid"] = pid
            ev["tid"] = tid
            ev["ring"] = i
            ev["vm"] = vm
            chunks.append(ev)
            total += len(ev)
        lat = 20_000 + int(rng.integers(0, 20_000))
        ev = empty(2 * vcpus + 1)
        for i in range(vcpus):
            entries = dirty[i] - reset[i]
            reset[i] = dirty[i]
            ev[i] = (t_end + 1000 + 500 * i, entries, pid, pid, dirty[i], reset[i], 0, i, vm,
                     Kind.RESET, b"")
            # the next period's pushes come after this ring's reset (their reset_index is
            # the new one): never before it, even with a push late in this period
            clock[i] = max(clock[i], t_end + 1001 + 500 * i)
        ev[vcpus] = (t_end + lat, lat, pid, pid, 0, 0, 0, -1, vm, Kind.RESET_LAT, b"")
        m = vcpus + 1
        for i in range(vcpus):
            if stalled[i] is not None:
                end = clock[i] - 1000
                ev[m] = (end, end - stalled[i], pid, pid + 1 + i, dirty[i], reset[i], 0, i, vm,
                         Kind.STALL, b"")
                m += 1
                stalled[i] = None
        chunks.append(ev[:m])
        total += m
        t = t_end
    out = np.concatenate(chunks)
    out = out[np.argsort(out["ts"], kind="stable")]
    return out[:n]


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


def measure(name: str, ev: np.ndarray, tmp: Path, repeat: int = 3) -> None:
    path = tmp / f"{name}.kvt"
    best_enc = best_dec = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        with RecordingWriter(path, SourceMeta(kind="bench")) as w:
            w.write(ev)
        best_enc = min(best_enc, time.perf_counter() - t0)
        rec = open_recording(path)
        t0 = time.perf_counter()
        got = 0
        for batch in rec.batches():
            got += len(batch)
        best_dec = min(best_dec, time.perf_counter() - t0)
    assert got == len(ev)
    size = path.stat().st_size
    print(f"{name:<28} {len(ev):>10} events {size / len(ev):6.2f} B/event  "
          f"encode {len(ev) / best_enc / 1e6:6.2f} M/s  decode {len(ev) / best_dec / 1e6:6.1f} M/s"
          f"  (raw 48 B/event: {48 * len(ev) / size:5.1f}x)")


def big(n: int, tmp: Path) -> None:
    path = tmp / "big.kvt"
    chunk = synthetic(1 << 20, vcpus=4)
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
    rec = open_recording(path)
    t0 = time.perf_counter()
    got = 0
    for batch in rec.batches():
        got += len(batch)
    dec = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"big file: {n} events, {path.stat().st_size / 2**20:.0f} MiB "
          f"({path.stat().st_size / n:.2f} B/event), write {n / enc / 1e6:.1f} M/s, "
          f"read {got / dec / 1e6:.1f} M/s, peak RSS {max(rss, rss0) / 1024:.0f} MiB "
          f"(before reading {rss0 / 1024:.0f} MiB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--big", type=int, default=0, help="also write+read a file of N events")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for vcpus in (1, 4):
            for pattern in ("seq", "random"):
                ev = synthetic(args.events, vcpus=vcpus, pattern=pattern)
                measure(f"{pattern} {vcpus} vCPU", ev, tmp)
        if SAMPLES.is_dir():
            for f in sorted(SAMPLES.glob("*.txt")):
                measure(f.name[:28], parse_sample(f), tmp, repeat=1)
        if args.big:
            big(args.big, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
