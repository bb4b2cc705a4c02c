#!/usr/bin/env python3
"""Benchmark: consuming a real BPF ring buffer, bulk numpy reader vs bcc's per-event callback.

    .venv/bin/python tools/bench_ringbuf.py [--rounds N] [--seconds S]   (root; bcc)

The kernel-side producer is tests/bpf/ringbuf_fill.c, a socket-filter program run with
BPF_PROG_TEST_RUN; each run writes PER_RUN struct kt_event records (48 bytes, 56 with the
ring's header) into a 64 MiB ring buffer.

- drain: the producer fills the ring, then the consumer empties it, timed alone: the
  consumer's own speed. Consumers: RingBufReader.read(65536) in a loop; bcc's
  ring_buffer_consume() with a callback that only counts; the same with a callback that
  decodes each record (ctypes cast, as a bcc tool would).
- stream: a producer thread runs BPF_PROG_TEST_RUN in a loop for --seconds while the
  consumer reads concurrently (2 cores: one each) until the ring is empty; records that
  found the ring full are counted by the BPF program. The bulk reader's consumed/s is
  bounded by the producer's speed here.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from typing import Any

from _common import ROOT, parser, require_root

from kvmtrace.bpf.ringbuf import RingBufReader
from kvmtrace.testing.prog_run import prog_test_run

PER_RUN = 256
RB_PAGES = 16384  # 64 MiB
RECORD = 56
BATCH = 1 << 16  # records per read(): bounded memory, reused by the allocator
CALLBACK: list[Any] = [None]  # bcc's ring buffer opens once; this picks its callback


class KtEvent(ctypes.Structure):
    _fields_ = [("ts", ctypes.c_uint64), ("value", ctypes.c_uint64), ("pid", ctypes.c_uint32),
                ("tid", ctypes.c_uint32), ("dirty_index", ctypes.c_uint32),
                ("reset_index", ctypes.c_uint32), ("slot", ctypes.c_uint32),
                ("ring", ctypes.c_int32), ("vm", ctypes.c_int32), ("kind", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3)]


def load() -> tuple[Any, Any]:
    from bcc import BPF

    from kvmtrace.bpf.loader import probes_dir
    from kvmtrace.host.headers import use_headers

    use_headers()
    cflags = [f"-DPER_RUN={PER_RUN}", "-DDISCARD_EVERY=0", f"-DRB_PAGES={RB_PAGES}"]
    with probes_dir() as inc:  # kvmtrace.h, the package's own copy
        b = BPF(src_file=str(ROOT / "tests/bpf/ringbuf_fill.c").encode(),
                cflags=[f"-I{inc}", *cflags])
    return b, b.load_func(b"fill", BPF.SOCKET_FILTER)


def lost(b: Any) -> int:
    return int(b[b"counters"][1].value)


def fill(b: Any, fn: Any) -> int:
    """Fill the (empty) ring without overflowing it; returns records written."""
    runs = RB_PAGES * 4096 // RECORD // PER_RUN
    before = lost(b)
    prog_test_run(fn.fd, repeat=runs)
    assert lost(b) == before, "ring overflowed while filling"
    return runs * PER_RUN


def drain(b: Any, fn: Any, rb: RingBufReader, rounds: int) -> dict[str, float]:
    got = {"bulk": 0, "bcc count": 0, "bcc decode": 0}
    spent = dict.fromkeys(got, 0.0)
    count = [0]

    def cb_count(ctx: Any, data: Any, size: int) -> int:
        count[0] += 1
        return 0

    def cb_decode(ctx: Any, data: Any, size: int) -> int:
        ev = ctypes.cast(data, ctypes.POINTER(KtEvent)).contents
        count[0] += ev.kind > 0
        return 0

    for _ in range(rounds):
        n = fill(b, fn)
        t0 = time.perf_counter()
        total = 0
        while total < n:
            total += len(rb.read(BATCH))
        spent["bulk"] += time.perf_counter() - t0
        got["bulk"] += total
        for name, cb in (("bcc count", cb_count), ("bcc decode", cb_decode)):
            n = fill(b, fn)
            CALLBACK[0] = cb
            count[0] = 0
            t0 = time.perf_counter()
            while count[0] < n:
                b.ring_buffer_consume()
            spent[name] += time.perf_counter() - t0
            got[name] += count[0]
    return {k: got[k] / spent[k] for k in got}


def stream(b: Any, fn: Any, rb: RingBufReader, seconds: float,
           bulk: bool) -> tuple[float, float, float]:
    """(produced/s, consumed/s, fraction lost) with producer and consumer concurrent."""
    runs = [0]
    count = [0]

    def produce() -> None:  # stops by itself: libbpf's poll returns only once it does
        while time.perf_counter() - t0 < seconds:
            prog_test_run(fn.fd, repeat=64)
            runs[0] += 64

    def cb(ctx: Any, data: Any, size: int) -> int:
        ev = ctypes.cast(data, ctypes.POINTER(KtEvent)).contents
        count[0] += ev.kind > 0
        return 0

    CALLBACK[0] = cb
    lost0 = lost(b)
    t0 = time.perf_counter()
    producer = threading.Thread(target=produce)
    producer.start()
    while producer.is_alive() or rb.pending_bytes():
        if not bulk:
            b.ring_buffer_poll(100)
        elif rb.wait(100):
            while len(batch := rb.read(BATCH)):
                count[0] += len(batch)
    producer.join()
    dt = time.perf_counter() - t0
    produced = runs[0] * PER_RUN
    return produced / dt, count[0] / dt, (lost(b) - lost0) / max(produced, 1)


def main() -> int:
    ap = parser(__doc__, rounds=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    require_root("bench_ringbuf", "BPF")
    b, fn = load()
    rb = RingBufReader(b[b"events"].map_fd)
    b[b"events"].open_ring_buffer(lambda ctx, data, size: CALLBACK[0](ctx, data, size))
    rates = drain(b, fn, rb, args.rounds)
    cap = RB_PAGES * 4096 // RECORD // PER_RUN * PER_RUN
    print(f"drain ({args.rounds} x {cap} records of {RECORD} bytes, 64 MiB ring):")
    for name, rate in rates.items():
        print(f"  {name:<11} {rate / 1e6:7.2f} M events/s   bulk/this = "
              f"{rates['bulk'] / rate:5.1f}x")
    print(f"stream ({args.seconds:.0f} s each, BPF_PROG_TEST_RUN thread + consumer):")
    for name, bulk in (("bulk", True), ("bcc decode", False)):
        produced, consumed, lost_frac = stream(b, fn, rb, args.seconds, bulk)
        print(f"  {name:<11} consumed {consumed / 1e6:7.2f} M events/s  (produced "
              f"{produced / 1e6:.2f} M/s, {100 * lost_frac:.1f} % found the ring full)")
    rb.close()
    b.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
