"""Event output through one ring per CPU: the merge rules (time, completeness, index order
within a ring) on hand-made batches, then the probes' own push program run in the kernel on
each CPU (BPF_PROG_TEST_RUN), each CPU's ring and its lost events counted exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import require
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtrace.bpf.percpu import EventMerge, ring_entries, ring_order, shared_rings
from kvmtrace.core.events import EVENT_DTYPE, Kind


def ev(ts: list[int], di: list[int], *, ring: int | np.ndarray = 0, kind: int = Kind.PUSH,
       ri: list[int] | None = None, tid: int = 5) -> np.ndarray:
    out = np.zeros(len(ts), EVENT_DTYPE)
    out["ts"] = ts
    out["dirty_index"] = di
    out["reset_index"] = ri if ri is not None else 0
    out["ring"] = ring
    out["kind"] = kind
    out["pid"] = 7
    out["tid"] = tid
    out["value"] = np.arange(len(ts)) + 100 * np.asarray(ring)
    return out


def test_ring_entries_is_the_largest_power_of_two_that_fits() -> None:
    assert [ring_entries(n) for n in (1, 2, 1024, 4096)] == [64, 128, 65536, 262144]


def test_time_order_is_a_stable_merge() -> None:
    a = ev([10, 20, 20, 40], [1, 2, 3, 4], ring=0)
    b = ev([15, 20, 30], [1, 2, 3], ring=1, tid=6)
    m = EventMerge()
    out = m.merge([a.copy(), b.copy()], None)
    assert out["ts"].tolist() == [10, 15, 20, 20, 20, 30, 40]
    # equal times: buffer 0's in its order, then buffer 1's
    assert list(zip(out["ring"].tolist(), out["dirty_index"].tolist(), strict=True)) == \
        [(0, 1), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3), (0, 4)]
    assert (m.reordered, m.late, m.held) == (0, 0, 0)


def test_events_after_the_limit_wait_for_the_next_merge() -> None:
    m = EventMerge()
    out = m.merge([ev([10, 30], [1, 2]), ev([20, 50], [1, 2], ring=1, tid=6)], 30)
    assert out["ts"].tolist() == [10, 20, 30]
    assert m.held == 1
    out = m.merge([ev([40], [3]), ev([], [])], 45)
    assert out["ts"].tolist() == [40]
    assert m.late == 0
    out = m.merge([ev([25], [4]), ev([], [])], None)  # stamped before 45, read after it
    assert out["ts"].tolist() == [25, 50]
    assert m.late == 1 and m.held == 0


def test_pushes_of_a_migrated_ring_keep_index_order_despite_clock_skew() -> None:
    """A vCPU thread moved from CPU 0 to CPU 1 whose clock runs 10 ns behind: pushes 4 and 5
    (CPU 1) carry times before push 3 (CPU 0). They take the ring's places in index
    order; another ring's events keep theirs."""
    cpu0 = np.concatenate([ev([10, 20, 30], [1, 2, 3]), ev([12], [9], ring=1, tid=6)])
    cpu0 = cpu0[np.argsort(cpu0["ts"], kind="stable")]
    cpu1 = ev([25, 28], [4, 5])
    m = EventMerge()
    out = m.merge([cpu0, cpu1], None)
    assert out["ts"].tolist() == [10, 12, 20, 30, 25, 28]
    assert out["dirty_index"].tolist() == [1, 9, 2, 3, 4, 5]
    assert m.reordered == 3  # pushes 3, 4, 5 moved between the places at 25, 28, 30


def test_resets_of_a_ring_go_by_reset_then_dirty_index() -> None:
    """Resets of one ring from a harvester that moved between CPUs, with u32 indices
    wrapping: ordered by reset_index, then dirty_index, in serial arithmetic."""
    big = 2**32 - 2
    a = ev([100, 300], [big + 1, 5], kind=Kind.RESET, ri=[big, 3])
    b = ev([200, 250], [3, 7], kind=Kind.RESET, ri=[1, 3], tid=9)
    x = np.concatenate([a, b])
    ids = shared_rings(x, np.array([0, 0, 1, 1], np.int32))
    assert ids is not None and ids.tolist() == [0, 0, 0, 0]
    order = np.argsort(x["ts"], kind="stable")
    x, ring_id = x[order], ids[order]
    assert x["reset_index"].tolist() == [big, 1, 3, 3]
    assert x["dirty_index"].tolist() == [big + 1, 3, 7, 5]
    assert ring_order(x, ring_id) == 2
    assert x["reset_index"].tolist() == [big, 1, 3, 3]
    assert x["dirty_index"].tolist() == [big + 1, 3, 5, 7]
    assert x["ts"].tolist() == [100, 200, 300, 250]


def test_a_ring_in_one_buffer_is_left_as_it_came() -> None:
    """Only rings seen in more than one buffer are reordered: one buffer's order is the
    order its CPU reserved the events in."""
    a = ev([10, 20, 30], [1, 3, 2])
    b = ev([15], [1], ring=1, tid=6)
    m = EventMerge()
    out = m.merge([a, b], None)
    assert out["dirty_index"].tolist() == [1, 1, 3, 2]
    assert m.reordered == 0
    assert shared_rings(np.concatenate([a, b]), np.array([0, 0, 0, 1], np.int32)) is None
    spread = np.zeros(8, EVENT_DTYPE)
    spread[::2] = np.concatenate([a, b])  # a strided view of the same events reads the same
    ids = shared_rings(spread[::2], np.array([0, 0, 1, 1], np.int32))
    assert ids is not None and ids.tolist() == [0, 0, 0, -1]


def test_held_events_count_as_their_buffers() -> None:
    """Events held by one merge keep their buffer: a ring whose pushes came through
    buffer 0 before the limit and buffer 1 after it is still put in index order."""
    m = EventMerge()
    out = m.merge([ev([10, 40], [1, 2]), ev([], [])], 20)
    assert out["dirty_index"].tolist() == [1]
    out = m.merge([ev([], []), ev([35], [3])], None)  # CPU 1's clock behind
    assert out["ts"].tolist() == [40, 35]
    assert out["dirty_index"].tolist() == [2, 3]
    assert m.reordered == 2


@pytest.mark.kernel
def test_push_program_fills_the_ring_of_its_cpu(bpf_root: None) -> None:
    """The record probes' push program, run on CPU 0 then CPU 1 (the test pinned there),
    lands in that CPU's ring; a full ring (one page: 64 records of 48 bytes, the largest
    power of two that fits) counts the rest as lost, per CPU; once read, a ring takes
    records again, and the reader hands them on merged in time order."""
    from kvmtrace.bpf.loader import Probes
    from kvmtrace.testing.prog_run import raw_tp_test_run

    cpus = sorted(os.sched_getaffinity(0))
    require(len(cpus) >= 2 and cpus[:2] == [0, 1], "needs CPUs 0 and 1")
    runs = {0: 100, 1: 80}
    fits = 64
    keep = os.sched_getaffinity(0)
    with Probes("record", pid=os.getpid(), hook="raw_tp", ringbuf_pages=1) as p:
        from bcc import BPF

        assert p.cpu_ring_entries == fits
        fd = p._bpf.load_func(b"raw_tracepoint__kvm_dirty_ring_push", BPF.RAW_TRACEPOINT).fd

        def push(base: int) -> None:
            for cpu, n in runs.items():
                os.sched_setaffinity(0, {cpu})
                try:
                    for i in range(n):
                        raw_tp_test_run(fd, (0, base + 1000 * cpu + i, i))
                finally:
                    os.sched_setaffinity(0, keep)

        push(0)
        lost = p.lost_per_buffer()
        assert len(lost) == p.nr_buffers
        assert lost[:2] == [runs[0] - fits, runs[1] - fits]
        assert sum(lost) == p.lost() == sum(runs.values()) - 2 * fits
        with p.event_reader() as reader:
            parts = [reader.read_cpu(cpu)[0] for cpu in (0, 1)]
            for cpu, got in enumerate(parts):
                assert got["slot"].tolist() == [1000 * cpu + i for i in range(fits)]
                assert set(got["kind"].tolist()) == {Kind.PUSH}
                assert set(got["pid"].tolist()) == {os.getpid()}
            push(5000)  # the rings are empty again: room for more
            merged = reader.read(final=True)
            assert reader.records == 4 * fits
        assert len(merged) == 2 * fits
        assert np.all(np.diff(merged["ts"].astype(np.int64)) >= 0)
        assert sorted(merged["slot"].tolist()) == \
            [5000 + i for i in range(fits)] + [6000 + i for i in range(fits)]
        assert p.lost_per_buffer()[:2] == [2 * (runs[0] - fits), 2 * (runs[1] - fits)]


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 50)),
                min_size=1, max_size=60),
       st.lists(st.integers(-30, 30), min_size=3, max_size=3),
       st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_merge_keeps_every_event_and_each_rings_index_order(
        pushes: list[tuple[int, int, int]], skew: list[int], base: int) -> None:
    """Pushes of 4 rings spread over 3 buffers in any way, each buffer's clock off by its
    own skew, indices wrapping u32: every event comes out once, each ring's pushes in
    index order."""
    parts = []
    count = [0] * 4
    per_buf: list[list[tuple[int, int, int]]] = [[], [], []]
    t = 1000
    for ring, buf, gap in pushes:
        t += gap
        count[ring] += 1
        per_buf[buf].append((t + skew[buf], (base + count[ring]) % 2**32, ring))
    for rows in per_buf:
        rows.sort(key=lambda r: r[0])  # a buffer is in its CPU's time order
        parts.append(ev([r[0] for r in rows], [r[1] for r in rows],
                        ring=np.array([r[2] for r in rows], np.int32)))
    total = np.concatenate(parts)
    out = EventMerge().merge(parts, None)
    assert sorted(map(bytes, out.view(np.dtype((np.void, 48))))) == \
        sorted(map(bytes, total.view(np.dtype((np.void, 48)))))
    for ring in range(4):
        di = out["dirty_index"][out["ring"] == ring]
        assert np.array_equal(di - np.uint32(base), np.arange(1, len(di) + 1))  # u32 wrap


def test_reader_merges_from_the_rings_memory_and_frees_it_after() -> None:
    """PerCpuReader over two rings in ordinary shared memory (memfd, laid out as the maps
    cpu_heads and cpu_events): CPU 0's new records wrap around the end of its ring. A read
    hands on exactly what EventMerge makes of copies of the records, sets each tail to its
    head only then, and what it returned is a copy: records written over in the rings
    afterwards do not change it."""
    from kvmtrace.bpf.layout import CPU_HEAD_DTYPE
    from kvmtrace.bpf.percpu import PerCpuReader

    entries = 64
    hfd, efd = os.memfd_create("heads"), os.memfd_create("events")
    try:
        os.ftruncate(hfd, 4096)  # whole pages, as BPF maps are mapped
        os.ftruncate(efd, 8192)
        cpu0 = ev(list(range(100, 140)), list(range(1, 41)))  # ring 0, 40 pushes
        cpu1 = ev(list(range(105, 125)), list(range(1, 21)), ring=1, tid=6)
        with PerCpuReader(hfd, efd, 2, entries) as reader:
            heads = np.frombuffer(reader._hm, CPU_HEAD_DTYPE, count=2)
            rings = np.frombuffer(reader._em, EVENT_DTYPE, count=2 * entries).reshape(2, -1)
            tail0 = 50  # records 50..89: ring slots 50..63, then 0..25
            at = (tail0 + np.arange(len(cpu0))) % entries
            rings[0][at] = cpu0
            rings[1][: len(cpu1)] = cpu1
            heads["tail"] = [tail0, 0]
            heads["head"] = [tail0 + len(cpu0), len(cpu1)]
            want = EventMerge().merge([cpu0.copy(), cpu1.copy()], None)
            got = reader.read(final=True)
            assert got.tobytes() == want.tobytes() and len(got) == 60
            assert heads["tail"].tolist() == heads["head"].tolist() == [90, 20]
            assert reader.records == 60
            rings[:] = np.zeros(1, EVENT_DTYPE)  # the programs write over the records
            assert got.tobytes() == want.tobytes()
            assert len(reader.read(final=True)) == 0
            del heads, rings  # the maps close only once no view of them is left
    finally:
        os.close(hfd)
        os.close(efd)


def test_a_part_read_in_two_pieces_is_one_source() -> None:
    """A ring read in two pieces (where it wraps) is one buffer for the index rule: its
    ring's events are not reordered against each other, exactly as one piece."""
    a = ev([10, 30, 20], [1, 3, 2])
    b = ev([15], [1], ring=1, tid=6)
    one = EventMerge().merge([a.copy(), b.copy()], None)
    m = EventMerge()
    two = m.merge([a[:2].copy(), a[2:].copy(), b.copy()], None, sources=[0, 0, 1])
    assert two.tobytes() == one.tobytes() and m.reordered == 0
