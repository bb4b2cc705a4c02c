"""Bulk BPF ring-buffer reader: record decoding rules, then a real ring buffer fed by a BPF
program run in the kernel with BPF_PROG_TEST_RUN (tests/bpf/ringbuf_fill.c)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvmtrace.bpf.ringbuf import (
    BUSY_BIT,
    DISCARD_BIT,
    RingBufReader,
    decode_records,
)
from kvmtrace.core.events import EVENT_DTYPE
from kvmtrace.errors import UsageError
from kvmtrace.testing.prog_run import prog_test_run

ROOT = Path(__file__).resolve().parents[1]
PER_RUN = 64
DISCARD_EVERY = 5
RB_PAGES = 64  # 256 KiB: 4681 records of 56 bytes


class FakeRing:
    """A ring's data area as the kernel maps it: ``size`` bytes, mapped twice."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.mem = np.zeros(size, np.uint8)
        self.prod = 0

    def put(self, payload: bytes, flags: int = 0) -> None:
        total = (len(payload) + 8 + 7) & ~7
        rec = np.zeros(total, np.uint8)
        rec[:4] = np.frombuffer(np.uint32(len(payload) | flags).tobytes(), np.uint8)
        rec[8 : 8 + len(payload)] = np.frombuffer(payload, np.uint8)
        idx = (self.prod + np.arange(total)) % self.size
        self.mem[idx] = rec
        self.prod += total

    def data(self) -> np.ndarray:
        return np.concatenate([self.mem, self.mem])


def events(first: int, n: int) -> np.ndarray:
    ev = np.zeros(n, EVENT_DTYPE)
    ev["ts"] = np.arange(first, first + n)
    ev["value"] = ev["ts"] * 3
    ev["ring"] = -7
    return ev


def test_decode_rules_and_wraparound() -> None:
    ring = FakeRing(1024)
    ring.prod = start = 1024 * 5 - 3 * 56  # three records before the end of the ring
    ev = events(100, 12)
    for i, e in enumerate(ev):
        flags = DISCARD_BIT if i in (4, 9) else 0
        ring.put(e.tobytes(), flags)
        if i == 6:
            ring.put(b"x" * 13)  # another producer's record size: skipped, counted
    got, cons, discarded, foreign = decode_records(ring.data(), start, ring.prod, 1023)
    np.testing.assert_array_equal(got, np.delete(ev, [4, 9]))
    assert (cons, discarded, foreign) == (ring.prod, 2, 1)

    got, cons3, discarded, _ = decode_records(ring.data(), start, ring.prod, 1023, limit=5)
    np.testing.assert_array_equal(got, ev[:4])  # 5 records consumed, the 5th discarded
    assert (cons3, discarded) == (start + 5 * 56, 1)

    ring.put(events(500, 1).tobytes(), BUSY_BIT)  # reserved, not committed yet
    ring.put(events(501, 1).tobytes())
    got, cons2, _, _ = decode_records(ring.data(), cons, ring.prod, 1023)
    assert len(got) == 0 and cons2 == cons  # nothing past a BUSY record


def test_decode_empty_and_partial_header() -> None:
    ring = FakeRing(4096)
    got, cons, _, _ = decode_records(ring.data(), 64, 64, 4095)
    assert len(got) == 0 and cons == 64


def compile_filler(pages: int = RB_PAGES) -> Any:
    from bcc import BPF

    from kvmtrace.bpf.loader import probes_dir
    from kvmtrace.host.headers import use_headers

    use_headers()
    cflags = [f"-DPER_RUN={PER_RUN}", f"-DDISCARD_EVERY={DISCARD_EVERY}", f"-DRB_PAGES={pages}"]
    with probes_dir() as inc:  # kvmtrace.h, the package's own copy
        b = BPF(src_file=str(ROOT / "tests/bpf/ringbuf_fill.c").encode(),
                cflags=[f"-I{inc}", *cflags])
    return b, b.load_func(b"fill", BPF.SOCKET_FILTER)


def expected(first: int, count: int) -> np.ndarray:
    """Records the filler writes for record numbers [first, first + count)."""
    n = np.arange(first, first + count, dtype=np.uint64)
    n = n[n % DISCARD_EVERY != DISCARD_EVERY - 1]
    ev = np.zeros(len(n), EVENT_DTYPE)
    ev["ts"] = n
    ev["value"] = n * np.uint64(3)
    ev["pid"] = 4242
    ev["tid"] = 17
    ev["dirty_index"] = n.astype(np.uint32)
    ev["reset_index"] = ~n.astype(np.uint32)
    ev["slot"] = 0xABCD
    ev["ring"] = (n % np.uint64(7)).astype(np.int32)
    ev["vm"] = -2
    ev["kind"] = (1 + n % np.uint64(6)).astype(np.uint8)
    return ev


@pytest.mark.kernel
def test_real_ringbuf_exact(bpf_root: None) -> None:
    b, fn = compile_filler()
    with RingBufReader(b[b"events"].map_fd) as rb:
        assert rb.size == RB_PAGES * 4096
        assert rb.wait(0) is False
        assert len(rb.read()) == 0
        produced = 0
        for runs in (20, 1, 33, 20, 20, 20, 20, 20, 7):  # 161 * 64 records: wraps twice
            prog_test_run(fn.fd, repeat=runs)
            assert rb.wait(0) is True
            got = rb.read()
            np.testing.assert_array_equal(got, expected(produced, runs * PER_RUN))
            produced += runs * PER_RUN
            assert rb.pending_bytes() == 0
        assert rb.records == produced - produced // DISCARD_EVERY
        assert rb.discarded == produced // DISCARD_EVERY
        assert rb.foreign == 0
    assert b[b"counters"][1].value == 0  # no record found the ring full
    b.cleanup()


@pytest.mark.kernel
def test_real_ringbuf_full(bpf_root: None) -> None:
    """More than fits: the ring keeps the first 4681 records (56 bytes each in 256 KiB,
    discarded ones included), the BPF side counts the rest as lost."""
    b, fn = compile_filler()
    fits = RB_PAGES * 4096 // 56
    with RingBufReader(b[b"events"].map_fd) as rb:
        prog_test_run(fn.fd, repeat=120)  # 7680 records
        got = rb.read()
        assert b[b"counters"][1].value == 120 * PER_RUN - fits
        np.testing.assert_array_equal(got, expected(0, fits))
        assert rb.discarded == fits // DISCARD_EVERY
        prog_test_run(fn.fd, repeat=1)  # room again after the read
        np.testing.assert_array_equal(rb.read(), expected(120 * PER_RUN, PER_RUN))
    b.cleanup()


@pytest.mark.kernel
def test_real_ringbuf_edge_triggered_wait(bpf_root: None) -> None:
    """edge=True: wait() reports the producer's wakeups, not pending data. The filler
    submits with flags 0: the kernel wakes the reader only for a record submitted while the
    reader had consumed everything before it."""
    b, fn = compile_filler()
    with RingBufReader(b[b"events"].map_fd) as level, \
            RingBufReader(b[b"events"].map_fd, edge=True) as rb:
        assert rb.wait(0) is False
        prog_test_run(fn.fd, repeat=1)  # reader caught up: the first record wakes it
        assert rb.wait(0) is True
        assert rb.wait(0) is False  # data still pending, but no new wakeup
        assert level.wait(0) is True  # level-triggered: pending data is enough
        prog_test_run(fn.fd, repeat=2)  # not caught up: no wakeup at all
        assert rb.wait(0) is False
        got = rb.read()  # everything accumulated, in one batch
        np.testing.assert_array_equal(got, expected(0, 3 * PER_RUN))
        assert rb.pending_bytes() == 0 and level.wait(0) is False
        prog_test_run(fn.fd, repeat=1)  # caught up again: woken again
        assert rb.wait(0) is True
        np.testing.assert_array_equal(rb.read(), expected(3 * PER_RUN, PER_RUN))
    b.cleanup()


def test_not_a_ringbuf() -> None:
    with pytest.raises(UsageError):
        RingBufReader(0)  # stdin is not a BPF map
