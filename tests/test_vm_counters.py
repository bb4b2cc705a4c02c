"""Per-VM counters (Snapshot.vm_counters): KVM_RESET_DIRTY_RINGS is a vm ioctl, so its
count, total time and latency histogram live once per VM, not on a ring. Hand-built events
with known latencies go through the Aggregator, ReplaySource, subtract(), the interval
rates and every view; each figure is checked against the latencies written here."""

from __future__ import annotations

import json

import numpy as np

from kvmtrace.analysis.aggregate import Aggregator, ReplaySource
from kvmtrace.analysis.rates import compute_interval, subtract
from kvmtrace.core.counters import HIST_BUCKETS, RingKey, Snapshot, VmCounters, VmKey
from kvmtrace.core.events import Kind, empty
from kvmtrace.core.sources import EventSource, SourceMeta
from kvmtrace.views.prometheus import render_metrics
from kvmtrace.views.top_render import render_top
from kvmtrace.views.topjson import interval_json

# VM (7, 3): two rings; latencies 3000 ns (bucket 11: 2048..4095) then 70 us and 100 us
# (bucket 16: 65536..131071). VM (7, 4): one ring, one reset of 1 ms (bucket 19).
LAT_A = (3000, 70_000, 100_000)
LAT_B = (1_000_000,)
CUT = 50_000  # ts between the first reset of VM (7, 3) and the others


def pushes(n: int, *, vm: int, ring: int, t0: int) -> np.ndarray:
    """n pushes into ring ``ring`` of VM (7, vm), 1 us apart, none reset."""
    ev = empty(n)
    ev["ts"] = t0 + 1000 * np.arange(n)
    ev["kind"], ev["pid"], ev["vm"], ev["ring"] = Kind.PUSH, 7, vm, ring
    ev["dirty_index"] = np.arange(1, n + 1)
    return ev


def reset_lat(ts: int, ns: int, *, vm: int) -> np.ndarray:
    """One KVM_RESET_DIRTY_RINGS of VM (7, vm) that took ``ns`` (ring -1, as recorded)."""
    ev = empty(1)
    ev["ts"], ev["kind"], ev["value"] = ts, Kind.RESET_LAT, ns
    ev["pid"], ev["vm"], ev["ring"] = 7, vm, -1
    return ev


def events() -> np.ndarray:
    ev = np.concatenate([
        pushes(10, vm=3, ring=0, t0=0),
        pushes(10, vm=3, ring=1, t0=1),
        pushes(10, vm=4, ring=0, t0=2),
        reset_lat(20_000, LAT_A[0], vm=3),
        reset_lat(60_000, LAT_A[1], vm=3),
        reset_lat(70_000, LAT_A[2], vm=3),
        reset_lat(80_000, LAT_B[0], vm=4),
    ])
    return ev[np.argsort(ev["ts"], kind="stable")]


def hist(*ns: int) -> list[int]:
    h = [0] * HIST_BUCKETS
    for v in ns:
        h[v.bit_length() - 1] += 1
    return h


def test_aggregator_keeps_one_table_per_vm_and_no_pseudo_ring():
    agg = Aggregator()
    agg.feed(events())
    snap = agg.snapshot()
    assert sorted(snap.rings) == [RingKey(7, 3, 0), RingKey(7, 3, 1), RingKey(7, 4, 0)]
    assert snap.vm_counters == {
        VmKey(7, 3): VmCounters(reset_ioctls=3, reset_ns=sum(LAT_A), reset_lat_hist=hist(*LAT_A)),
        VmKey(7, 4): VmCounters(reset_ioctls=1, reset_ns=sum(LAT_B), reset_lat_hist=hist(*LAT_B)),
    }
    assert VmKey(7, 3) == (7, 3) and set(snap.vm_counters) <= set(snap.vms)


def test_interval_reset_percentile_is_the_vms_delta_on_every_row():
    ev = events()
    a, b = Aggregator(), Aggregator()
    a.feed(ev[ev["ts"] < CUT])
    b.feed(ev)
    first, last = a.snapshot(CUT), b.snapshot(100_000)
    iv = compute_interval(first, last)
    # VM (7, 3) in the interval: 70 us and 100 us (bucket 16) -> p99 = 2**17 ns; the 3 us
    # reset before CUT is not in it. VM (7, 4): 1 ms (bucket 19) -> 2**20 ns.
    assert [(v.pid, v.vm, v.reset_p99_ns, v.reset_lat_hist) for v in iv.vms] == [
        (7, 3, 1 << 17, hist(*LAT_A[1:])), (7, 4, 1 << 20, hist(*LAT_B))]
    assert [(r.vm, r.index, r.reset_p99_ns) for r in iv.rings] == [
        (3, 0, 1 << 17), (3, 1, 1 << 17), (4, 0, 1 << 20)]
    assert iv.total().reset_lat_hist == hist(*LAT_A[1:], *LAT_B)
    since_start = compute_interval(None, first)
    assert [v.reset_p99_ns for v in since_start.vms] == [1 << 12, None]  # 3000 ns: bucket 11
    js = interval_json(iv, wall_time=None, mode="full")
    assert [v["reset_p99_ns"] for v in js["vms"]] == [1 << 17, 1 << 20]
    assert [r["reset_p99_ns"] for r in js["rings"]] == [1 << 17, 1 << 17, 1 << 20]
    json.dumps(js)
    text = "\n".join(render_top(iv, 200, None, "push", clock="t", source="replay", hooks={},
                                pid=0, mode="full"))
    assert "131us" in text and "1.0ms" in text  # fmt_ns of 2**17 ns and 2**20 ns


def test_subtract_takes_the_baseline_off_each_vm():
    ev = events()
    a, b = Aggregator(), Aggregator()
    a.feed(ev[ev["ts"] < CUT])
    b.feed(ev)
    since = subtract(b.snapshot(), a.snapshot())
    assert since.vm_counters == {
        VmKey(7, 3): VmCounters(reset_ioctls=2, reset_ns=sum(LAT_A[1:]),
                                reset_lat_hist=hist(*LAT_A[1:])),
        VmKey(7, 4): VmCounters(reset_ioctls=1, reset_ns=sum(LAT_B), reset_lat_hist=hist(*LAT_B)),
    }


def test_prometheus_reset_histogram_per_vm():
    agg = Aggregator()
    agg.feed(events())
    lines = render_metrics(agg.snapshot()).splitlines()
    counts = [ln for ln in lines if ln.startswith("kvmtrace_reset_latency_seconds_count")]
    assert counts == [
        'kvmtrace_reset_latency_seconds_count{pid="7",vm="3",vm_gen="0",comm=""} 3',
        'kvmtrace_reset_latency_seconds_count{pid="7",vm="4",vm_gen="0",comm=""} 1']
    le = repr((1 << 12) / 1e9)  # bucket 11 ends below 2**12 ns
    assert (f'kvmtrace_reset_latency_seconds_bucket{{pid="7",vm="3",vm_gen="0",comm="",'
            f'le="{le}"}} 1') in lines
    assert not any("ring=\"-1\"" in ln for ln in lines)


def test_replay_source_ends_with_the_aggregators_vm_counters():
    ev = events()

    class Src(EventSource):
        meta = SourceMeta(kind="recording")
        lost = 0

        def batches(self):
            yield from np.array_split(ev, 3)

    rs = ReplaySource(Src(), 10_000)
    while not rs.done:
        snap = rs.snapshot()
    agg = Aggregator()
    agg.feed(ev)
    assert snap.vm_counters == agg.snapshot().vm_counters
    assert isinstance(snap, Snapshot) and rs.warnings == [] and not Src().truncated
