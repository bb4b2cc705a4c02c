"""Dirty rate in QEMU's terms (entries pushed per second x 4096 / 2**20, MiB/s of 4 KiB
pages) in top's text and JSON views, Prometheus and replay, from counts set by hand."""

from __future__ import annotations

import json
import subprocess

from conftest import kvmtrace_cmd

from kvmtrace.analysis.rates import compute_interval, dirty_rate_mbps
from kvmtrace.core.counters import RingCounters, RingKey, Snapshot, VmInfo
from kvmtrace.testing.qemu import qemu_mbps
from kvmtrace.views.prometheus import render_metrics
from kvmtrace.views.top_render import HEADER_LINES, WAITING, render_top
from kvmtrace.views.topjson import interval_json

SEC = 1_000_000_000


def snapshots() -> tuple[Snapshot, Snapshot]:
    """VM (100, 5): ring 0 pushes 2560 entries/s (10 MiB/s), ring 1 256/s (1 MiB/s), over 4 s."""
    a = Snapshot(time_ns=10 * SEC)
    a.rings[RingKey(100, 5, 0)] = RingCounters(pushes=1000, size=4096)
    a.rings[RingKey(100, 5, 1)] = RingCounters(pushes=7, size=4096)
    b = Snapshot(time_ns=14 * SEC)
    b.rings[RingKey(100, 5, 0)] = RingCounters(pushes=1000 + 4 * 2560, size=4096)
    b.rings[RingKey(100, 5, 1)] = RingCounters(pushes=7 + 4 * 256, size=4096)
    b.vms[(100, 5)] = VmInfo(pid=100, vm=5, comm="qemu-system-x86", ring_bytes=65536)
    return a, b


def test_definition():
    assert dirty_rate_mbps(256.0) == 1.0  # 256 pages of 4 KiB = 1 MiB
    assert dirty_rate_mbps(None) is None
    # QEMU 7.2: MiB truncated, then MiB/s truncated (migration/dirtyrate.c)
    assert qemu_mbps(322672, 2000) == 630  # 1260.44 MiB over 2 s
    assert qemu_mbps(511, 1000) == 1 and qemu_mbps(512, 1000) == 2


def test_top_text_and_json():
    a, b = snapshots()
    iv = compute_interval(a, b)
    lines = render_top(iv, 80, 24, "vm")
    assert all(len(line) <= 80 for line in lines)
    titles = lines[HEADER_LINES].split()
    col = titles.index("MB/s")
    rows = {ln.split()[0]: ln.split() for ln in lines[HEADER_LINES + 1:]}
    assert rows["100:5"][col + 1] == "11"  # the label "100:5 qemu-system-x86" is 2 words
    assert rows["vcpu0"][col] == "10" and rows["vcpu1"][col] == "1.0"
    obj = interval_json(iv)
    assert [r["dirty_rate_mbps"] for r in obj["rings"]] == [10.0, 1.0]
    assert obj["vms"][0]["dirty_rate_mbps"] == 11.0
    assert [r["push_rate"] for r in obj["rings"]] == [2560.0, 256.0]


def test_prometheus():
    a, b = snapshots()
    lab = 'pid="100",vm="5",vm_gen="0",ring="0",comm="qemu-system-x86"'
    first = render_metrics(b).splitlines()
    assert f"kvmtrace_ring_dirty_bytes_total{{{lab}}} {(1000 + 4 * 2560) * 4096}" in first
    assert not any(ln.startswith("kvmtrace_ring_dirty_rate_mbps{") for ln in first)
    lines = render_metrics(b, a).splitlines()
    assert f"kvmtrace_ring_dirty_rate_mbps{{{lab}}} 10.0" in lines
    assert ('kvmtrace_vm_dirty_rate_mbps{pid="100",vm="5",vm_gen="0",comm="qemu-system-x86"}'
            ' 11.0') in lines


def test_top_says_dirty_logging_off():
    """A VM whose ring size is known (KVM_ENABLE_CAP seen) and that never pushed: a line
    that says why nothing shows, not the empty screen."""
    snap = Snapshot(time_ns=SEC)
    snap.vms[(300, 9)] = VmInfo(pid=300, vm=9, comm="qemu-system-x86", name="web01",
                                ring_bytes=65536)
    iv = compute_interval(None, snap)
    lines = render_top(iv, 80, 24)
    assert lines[HEADER_LINES + 1:] == [
        "300:9 web01   ring 4096 entries, 0 pushes",
        "  dirty logging off: starts with a migration, calc-dirty-rate or a dirty limit"]
    assert interval_json(iv)["idle_vms"] == [{"pid": 300, "vm": 9, "vm_gen": 0,
                                              "comm": "qemu-system-x86", "name": "web01",
                                              "ring_bytes": 65536}]
    # top --light learns pushes at resets only: no claim about dirty logging there
    assert WAITING in render_top(iv, 80, 24, mode="light")[-1]
    a, b = snapshots()  # a VM with pushes is not idle
    assert compute_interval(a, b).idle == []


def test_replay_fields(samples):
    """replay --json: per ring, per VM and per window, with the definition applied to the
    replay's own pushes per second (3 vCPUs x 400 pages of a perf script sample)."""
    p = subprocess.run(kvmtrace_cmd("replay", "--json",
                                    str(samples / "perf-script-3vcpu-4096B-400pages.txt")),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    ws = {w["index"]: w for w in d["workingset"]["rings"]}
    for r in d["rings"]:
        w = ws[r["index"]]
        assert r["dirty_rate_mbps"] == w["dirty_rate_mbps"] == round(
            w["rate_per_s"] * 4096 / 2**20, 3)
        assert [x[0] for x in w["window_dirty_rate_mbps"]] == [x[0] for x in w["windows"]]
    (vm,) = d["vms"]
    assert (vm["rings"], vm["pushes"]) == (3, 1200)
    text = subprocess.run(kvmtrace_cmd("replay", str(samples /
                                                     "perf-script-3vcpu-4096B-400pages.txt")),
                          capture_output=True, text=True, timeout=120).stdout
    assert "MB/s" in text and all(len(ln) <= 80 for ln in text.splitlines())
