"""Aggregator, ReplaySource and rates: exact counters on synthetic streams and the shared
real-kernel samples (tests/data/samples, facts from their README)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvmtrace.analysis.aggregate import Aggregator, ReplaySource, log2_buckets
from kvmtrace.analysis.rates import compute_interval, subtract
from kvmtrace.core.counters import HIST_BUCKETS, RingKey, Snapshot, VmCounters, VmKey
from kvmtrace.core.events import Kind, empty
from kvmtrace.core.sources import EventSource, SourceMeta
from kvmtrace.source.detect import open_source


def parse_sample(path: Path, **ring) -> tuple[np.ndarray, SourceMeta]:
    """All events of a sample through the real importers (kvmtrace.source.detect)."""
    src = open_source(path, **ring)
    return np.concatenate(list(src.batches())), src.meta


def count_lines(path: Path, needle: str) -> int:
    return sum(needle in line for line in path.read_text().splitlines())


# -- synthetic streams -------------------------------------------------------------------
def synth(pushes: int, *, ring: int = 0, pid: int = 7, vm: int = 3, t0: int = 0,
          reset_every: int | None = None, dt: int = 1000) -> np.ndarray:
    """pushes into one ring, a reset (all entries) every ``reset_every`` pushes."""
    out = []
    di = ri = 0
    t = t0
    for i in range(pushes):
        di += 1
        e = empty(1)
        e[0]["ts"], e[0]["kind"], e[0]["dirty_index"], e[0]["reset_index"] = t, Kind.PUSH, di, ri
        out.append(e)
        t += dt
        if reset_every and (i + 1) % reset_every == 0:
            ri = di
            r = empty(1)
            r[0]["ts"], r[0]["kind"] = t, Kind.RESET
            r[0]["dirty_index"], r[0]["reset_index"] = di, ri
            out.append(r)
            t += dt
    ev = np.concatenate(out)
    ev["pid"], ev["vm"], ev["ring"] = pid, vm, ring
    return ev


def one(kind: Kind, ts: int, value: int = 0, *, pid: int = 7, vm: int = 3, ring: int = 0):
    e = empty(1)
    e[0]["ts"], e[0]["kind"], e[0]["value"] = ts, kind, value
    e[0]["pid"], e[0]["vm"], e[0]["ring"] = pid, vm, ring
    return e


def test_log2_buckets_exact():
    v = np.array([0, 1, 2, 3, 4, 1023, 1024, (1 << 39) - 1, 1 << 39, 1 << 45], dtype=np.uint64)
    h = log2_buckets(v)
    assert len(h) == HIST_BUCKETS
    want = [0] * HIST_BUCKETS
    for b in (0, 0, 1, 1, 2, 9, 10, 38, 39, 39):
        want[b] += 1
    assert h.tolist() == want


def test_counters_exact_on_synthetic_stream():
    ev = synth(1000, reset_every=192)
    ev = np.concatenate([ev, one(Kind.EXIT, 10**7), one(Kind.EXIT, 10**7 + 1)])
    agg = Aggregator()
    agg.feed(ev)
    snap = agg.snapshot()
    (key, c), = snap.rings.items()
    assert key == RingKey(7, 3, 0)
    assert (c.pushes, c.resets, c.entries_reset, c.soft_full_exits) == (1000, 5, 960, 2)
    assert (c.dirty_index, c.reset_index, c.used, c.max_used) == (1000, 960, 40, 192)
    assert c.size is None and c.lost == 0


def test_chunking_does_not_change_the_result():
    ev = np.concatenate([synth(700, ring=r, reset_every=100 + r, dt=3) for r in range(3)])
    ev = ev[np.argsort(ev["ts"], kind="stable")]
    whole = Aggregator()
    whole.feed(ev)
    pieces = Aggregator()
    rng = np.random.default_rng(1)
    cuts = np.sort(rng.choice(len(ev), 40, replace=False))
    for part in np.split(ev, cuts):
        pieces.feed(part)
    assert pieces.snapshot().rings == whole.snapshot().rings
    assert sum(c.pushes for c in whole.snapshot().rings.values()) == 2100


def test_overflow_counts_lost_entries_and_ring_size_event():
    size_ev = one(Kind.RING_SIZE, 0, 4096, ring=-1)
    agg = Aggregator()
    agg.feed(np.concatenate([size_ev, synth(300, t0=10)]))
    snap = agg.snapshot()
    c = snap.rings[RingKey(7, 3, 0)]
    assert (c.size, c.pushes, c.lost, c.max_used, c.used) == (256, 300, 44, 300, 300)
    assert list(snap.rings) == [RingKey(7, 3, 0)]  # the size event makes no ring row
    assert snap.vms[(7, 3)].ring_bytes == 4096


def test_size_from_meta_and_late_size_event():
    meta = SourceMeta(kind="ftrace", ring_entries={(-1, -1): 512})
    agg = Aggregator(meta)
    agg.feed(synth(10))
    assert agg.snapshot().rings[RingKey(7, 3, 0)].size == 512
    agg.feed(one(Kind.RING_SIZE, 10**6, 8192 * 2, ring=-1))
    assert agg.snapshot().rings[RingKey(7, 3, 0)].size == 1024


def test_stall_and_reset_latency_histograms():
    ev = np.concatenate([
        synth(5),
        one(Kind.STALL, 10**5, 1500),
        one(Kind.STALL, 10**5 + 1, 3_000_000),
        one(Kind.RESET_LAT, 10**5 + 2, 70_000, ring=-1),
    ])
    agg = Aggregator()
    agg.feed(ev)
    snap = agg.snapshot()
    c = snap.rings[RingKey(7, 3, 0)]
    assert c.stall_ns == 3_001_500
    assert [i for i, n in enumerate(c.stall_hist) if n] == [10, 21]
    assert list(snap.rings) == [RingKey(7, 3, 0)]  # VM-wide: in the VM's counters
    vc = snap.vm_counters[VmKey(7, 3)]
    assert (vc.reset_ioctls, vc.reset_ns) == (1, 70_000)
    assert [i for i, n in enumerate(vc.reset_lat_hist) if n] == [16]
    iv = compute_interval(None, snap)
    assert [(r.index, r.reset_p99_ns) for r in iv.rings] == [(0, 1 << 17)]
    assert iv.rings[0].stall_p99_ns == 1 << 22 and iv.rings[0].stall_p50_ns == 1 << 11
    assert iv.vms[0].rings == 1


def test_pid_filter():
    agg = Aggregator(pid=8)
    agg.feed(np.concatenate([synth(10, pid=7), synth(4, pid=8, ring=1)]))
    assert {k: c.pushes for k, c in agg.snapshot().rings.items()} == {RingKey(8, 3, 1): 4}


def test_rates_and_baseline():
    agg = Aggregator()
    agg.feed(synth(100, dt=10_000_000))  # 100 pushes over ~1 s
    a = agg.snapshot(time_ns=1_000_000_000)
    agg.feed(synth(300, t0=2 * 10**9, dt=1000, reset_every=150)[100:])
    b = agg.snapshot(time_ns=3_000_000_000)
    iv = compute_interval(a, b)
    (r,) = iv.rings
    assert iv.interval_s == 2.0
    assert (r.d_pushes, r.push_rate, r.pushes) == (200, 100.0, 300)
    assert (r.d_resets, r.reset_rate, r.entries_per_reset) == (2, 1.0, 150.0)
    zeroed = compute_interval(subtract(a, a), subtract(b, a))
    assert (zeroed.rings[0].pushes, zeroed.rings[0].push_rate) == (200, 100.0)


def test_replay_source_steps_through_file_time():
    ev = synth(1000, dt=1_000_000, reset_every=100)  # 1000 pushes + 10 resets over 1.01 s
    last = int(ev["ts"][-1])

    class Src(EventSource):
        meta = SourceMeta(kind="recording")
        lost = 3

        def batches(self):
            yield from np.array_split(ev, 7)

    rs = ReplaySource(Src(), 250_000_000)
    snaps = [rs.snapshot()]
    while not rs.done:
        snaps.append(rs.snapshot())
    assert len(snaps) == 1 + 5  # windows of 0.25 s over 0 .. 1.009 s
    assert [s.time_ns for s in snaps] == [0, 250 * 10**6, 500 * 10**6, 750 * 10**6, 10**9, last]
    pushes = [sum(c.pushes for c in s.rings.values()) for s in snaps]
    push_ts = ev["ts"][ev["kind"] == Kind.PUSH]
    n_before = [int((push_ts < t * 10**6).sum()) for t in (250, 500, 750, 1000)]
    assert pushes == [0, *n_before, 1000]
    assert snaps[-1].lost_events == 3 and snaps[-2].lost_events == 0
    assert rs.snapshot().rings == snaps[-1].rings  # after the end: the final state again
    deltas = [compute_interval(a, b).rings for a, b in zip(snaps, snaps[1:], strict=False)]
    assert sum(r[0].d_pushes for r in deltas if r) == 1000


def test_ftrace_sample(samples: Path):
    ev, meta = parse_sample(samples / "ftrace-1vcpu-8192B-800pages.txt", ring_bytes=8192)
    agg = Aggregator(meta)
    agg.feed(ev)
    snap = agg.snapshot()
    (key, c), = snap.rings.items()
    assert key.ring == 0
    assert (c.pushes, c.soft_full_exits, c.resets) == (800, 1, 2)
    assert (c.dirty_index, c.reset_index, c.entries_reset, c.used) == (800, 800, 800, 0)
    assert (c.max_used, c.size, c.lost) == (448, 512, 0)  # soft limit 512 - 64


def test_perf_sample(samples: Path):
    path = samples / "perf-script-3vcpu-4096B-400pages.txt"
    ev, meta = parse_sample(path, ring_entries=256)
    agg = Aggregator(meta)
    for part in np.array_split(ev, 5):
        agg.feed(part)
    snap = agg.snapshot()
    assert sorted(k.ring for k in snap.rings) == [0, 1, 2]
    for key, c in sorted(snap.rings.items()):
        assert c.pushes == 400 and c.size == 256
        assert c.resets == count_lines(path, f"kvm_dirty_ring_reset: ring {key.ring}:")
        assert c.soft_full_exits == count_lines(path, f"kvm_dirty_ring_exit: vcpu {key.ring}")
        assert (c.entries_reset, c.used, c.reset_index, c.lost) == (400, 0, 400, 0)
        assert c.max_used <= 192 + 1
    assert sum(c.soft_full_exits for c in snap.rings.values()) == count_lines(
        path, "kvm_dirty_ring_exit")
    iv = compute_interval(Snapshot(time_ns=int(ev["ts"][0])), snap)
    assert sum(r.d_pushes for r in iv.rings) == 1200


def test_vm_wide_reset_latency_counted_once_per_ioctl():
    """KT_RESET_LAT (ring -1) is one KVM_RESET_DIRTY_RINGS ioctl of the whole VM."""
    from kvmtrace.views.prometheus import render_metrics

    ev = np.concatenate([synth(4, ring=0), synth(4, ring=1, t0=1),
                         one(Kind.RESET_LAT, 10**4, 5000, ring=-1),
                         one(Kind.RESET_LAT, 10**4 + 1, 9000, ring=-1)])
    agg = Aggregator()
    agg.feed(ev[np.argsort(ev["ts"], kind="stable")])
    snap = agg.snapshot()
    assert sorted(snap.rings) == [RingKey(7, 3, 0), RingKey(7, 3, 1)]
    lat = [0] * HIST_BUCKETS
    lat[12] = lat[13] = 1  # 5000 ns, 9000 ns
    assert snap.vm_counters == {VmKey(7, 3): VmCounters(reset_ioctls=2, reset_ns=14_000,
                                                        reset_lat_hist=lat)}
    (vm,) = compute_interval(None, snap).vms
    assert sum(vm.reset_lat_hist) == 2 and vm.reset_p99_ns == 1 << 14
    lines = render_metrics(snap).splitlines()
    counts = [ln for ln in lines if ln.startswith("kvmtrace_reset_latency_seconds_count")]
    assert counts == ['kvmtrace_reset_latency_seconds_count{pid="7",vm="3",vm_gen="0",comm=""} 2']
