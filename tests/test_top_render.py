"""``kvmtrace top`` without a kernel: the pure renderer, key handling, batch JSON, the
Prometheus exposition (scraped over HTTP) and the CLI's error handling."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest
from conftest import kvmtrace_cmd

from kvmtrace.analysis.rates import compute_interval
from kvmtrace.core.counters import (
    HIST_BUCKETS,
    RingCounters,
    RingKey,
    Snapshot,
    VmCounters,
    VmInfo,
    VmKey,
)
from kvmtrace.core.sources import SnapshotSource, SourceMeta
from kvmtrace.errors import UsageError
from kvmtrace.views.prometheus import Exporter, parse_listen, render_metrics
from kvmtrace.views.top_curses import TopState
from kvmtrace.views.top_render import (
    HEADER_LINES,
    SORT_KEYS,
    WAITING,
    column_span,
    fmt_count,
    fmt_ns,
    fmt_rate,
    render_top,
)
from kvmtrace.views.topjson import SCHEMA, interval_json

SEC = 1_000_000_000


def hist(**buckets: int) -> list[int]:
    h = [0] * HIST_BUCKETS
    for k, n in buckets.items():
        h[int(k[1:])] = n
    return h


def two_snapshots() -> tuple[Snapshot, Snapshot]:
    """VM (100, 5) with rings 0 and 1 (size 256), VM (200, 7) with one ring of unknown size."""
    a = Snapshot(time_ns=10 * SEC)
    a.rings[RingKey(100, 5, 0)] = RingCounters(pushes=1000, resets=4, entries_reset=800,
                                               soft_full_exits=4, size=256)
    a.rings[RingKey(100, 5, 1)] = RingCounters(pushes=10, size=256)
    a.rings[RingKey(200, 7, 0)] = RingCounters(pushes=50)
    b = Snapshot(time_ns=12 * SEC, lost_events=2)
    b.rings[RingKey(100, 5, 0)] = RingCounters(
        pushes=5000, resets=8, entries_reset=1600, soft_full_exits=10, dirty_index=5000,
        reset_index=4872, max_used=192, size=256, stall_hist=hist(b20=99, b24=1),
        stall_ns=99 * 1_500_000 + 20_000_000)
    b.rings[RingKey(100, 5, 1)] = RingCounters(pushes=30, dirty_index=30, reset_index=0,
                                               max_used=30, size=256)
    b.vm_counters[VmKey(100, 5)] = VmCounters(reset_ioctls=3, reset_ns=3 * 40_000,
                                             reset_lat_hist=hist(b15=3))
    b.rings[RingKey(200, 7, 0)] = RingCounters(pushes=2050, dirty_index=2050, reset_index=2000,
                                               max_used=300, lost=44)
    b.vms[(100, 5)] = VmInfo(pid=100, vm=5, comm="qemu-system-x86", name="db1", ring_bytes=4096)
    b.vms[(200, 7)] = VmInfo(pid=200, vm=7, comm="python3")
    return a, b


def test_formatters():
    assert [fmt_rate(x) for x in (0, 0.5, 12.34, 999, 1234, 12345, 123456, 2.5e6)] == [
        "0", "0.5", "12", "999", "1.23k", "12.3k", "123k", "2.50M"]
    assert [fmt_ns(x) for x in (None, 512, 1500, 16384, 1 << 21, 3 * SEC)] == [
        "-", "512ns", "1.5us", "16us", "2.1ms", "3.0s"]
    assert [fmt_count(x) for x in (None, 0, 65536, 1_234_567)] == ["?", "0", "65536", "1.23M"]


def test_render_80x24_rows_and_totals():
    a, b = two_snapshots()
    iv = compute_interval(a, b)
    lines = render_top(iv, 80, 24, "push", clock="12:00:00", hooks={"kvm_dirty_ring_push": "tp"})
    assert all(len(line) <= 80 for line in lines) and len(lines) <= 24
    assert lines[0].startswith("kvmtrace top - 12:00:00")
    assert lines[1].startswith("VMs 2  rings 3  push/s 3.01k  exits/s 3.0  resets/s 2.0  lost 44")
    assert lines[1].endswith("events lost 2")
    assert lines[2] == "hooks: tp push"
    # E/RST yields its place to MB/s below 86 columns
    assert lines[HEADER_LINES].split() == ["VM/VCPU", "SIZE", "USED", "FIL%", "MAXU", "PUSH/s",
                                           "MB/s", "EXIT/s", "STL99", "RST/s", "RST99", "LOST"]
    body = [line.split() for line in lines[HEADER_LINES + 1:]]
    # VM 100 pushes 2010/s > VM 200 1000/s; inside VM 100 ring 0 (2000/s) before ring 1.
    assert [row[:2] for row in body] == [["100:5", "db1"], ["vcpu0", "256"], ["vcpu1", "256"],
                                         ["200:7", "python3"], ["vcpu0", "?"]]
    # MB/s = pushes/s x 4096 / 2**20: 2010/s -> 7.85, 2000/s -> 7.81, 10/s -> 0.04
    assert body[0][2:] == ["256", "158", "31%", "192", "2.01k", "7.9", "3.0", "2.1ms", "2.0",
                           "66us", "0"]
    assert body[1][1:] == ["256", "128", "50%", "192", "2.00k", "7.8", "3.0", "2.1ms", "2.0",
                           "66us", "0"]
    assert body[2][1:] == ["256", "30", "12%", "30", "10", "0.0", "0", "-", "0", "66us", "0"]
    assert body[4][1:] == ["?", "50", "?", "300", "1.00k", "3.9", "0", "-", "0", "-", "44"]
    wide = render_top(iv, 86, 24, "push")
    assert wide[HEADER_LINES].split()[6:11] == ["MB/s", "EXIT/s", "STL99", "RST/s", "E/RST"]


def test_sort_keys_reverse_and_span():
    a, b = two_snapshots()
    iv = compute_interval(a, b)
    by_lost = [ln.split()[0] for ln in render_top(iv, 80, 24, "lost")[HEADER_LINES + 1:]]
    assert by_lost == ["200:7", "vcpu0", "100:5", "vcpu0", "vcpu1"]
    rev = [ln.split()[0] for ln in render_top(iv, 80, 24, "push", reverse=True)[4:]]
    assert rev == ["200:7", "vcpu0", "100:5", "vcpu1", "vcpu0"]
    titles = render_top(iv, 80, 24)[HEADER_LINES]
    for key, title in (("push", "PUSH/s"), ("lost", "LOST"), ("size", "SIZE"),
                       ("stall", "STL99")):
        start, end = column_span(80, key)
        assert titles[start:end].strip() == title
    for key in SORT_KEYS:
        render_top(iv, 80, 24, key)


def test_waiting_small_screens_help_and_narrow():
    empty = compute_interval(None, Snapshot(time_ns=0))
    assert WAITING in render_top(empty, 80, 24)
    assert "Waiting for pid 42" in render_top(empty, 80, 24, pid=42)[-1]
    a, b = two_snapshots()
    iv = compute_interval(a, b)
    short = render_top(iv, 80, 7)
    assert len(short) == 7 and short[-1] == "... 3 more rows (-p PID to filter)"
    helped = render_top(iv, 80, 24, show_help=True)
    assert any("reset counters" in ln for ln in helped) and all(len(x) <= 80 for x in helped)
    narrow = render_top(iv, 60, 24)
    assert all(len(x) <= 60 for x in narrow)
    assert narrow[HEADER_LINES].split()[1:4] == ["USED", "FIL%", "PUSH/s"]
    assert render_top(iv, 80, 24, pid=200)[0].endswith("pid 200")
    only = compute_interval(a, b, pid=200)
    assert [r.pid for r in only.rings] == [200] and len(only.vms) == 1


def test_keys():
    st = TopState()
    assert st.handle_key(ord("s")) and st.sort_key == SORT_KEYS[SORT_KEYS.index("push") + 1]
    st.handle_key(ord("<"))
    st.handle_key(ord("<"))
    assert st.sort_key == SORT_KEYS[SORT_KEYS.index("push") - 1]
    st.handle_key(ord("R"))
    assert st.reverse
    st.handle_key(ord("r"))
    assert st.reset_requested
    st.handle_key(ord("h"))
    assert st.show_help
    assert st.handle_key(ord("x")) and not st.show_help  # any key leaves help
    for ch in b"p12\x7f34\n":
        st.handle_key(ch)
    assert st.pid == 134 and st.status is None
    st.handle_key(ord("p"))
    assert st.status and st.status.endswith(": ")
    st.handle_key(27)
    assert st.pid == 134
    assert st.handle_key(ord("q")) is False


def test_batch_json_schema():
    a, b = two_snapshots()
    obj = interval_json(compute_interval(a, b), wall_time=1700000000.0)
    obj = json.loads(json.dumps(obj))
    assert (obj["schema"], obj["time"], obj["interval_s"], obj["lost_events"]) == (
        SCHEMA, 1700000000.0, 2.0, 2)
    r0 = obj["rings"][0]
    assert {k: r0[k] for k in ("pid", "vm", "index", "size", "pushes", "soft_full_exits",
                               "resets", "entries_reset", "lost", "used", "max_used")} == {
        "pid": 100, "vm": 5, "index": 0, "size": 256, "pushes": 5000, "soft_full_exits": 10,
        "resets": 8, "entries_reset": 1600, "lost": 0, "used": 128, "max_used": 192}
    assert (r0["push_rate"], r0["exit_rate"], r0["entries_per_reset"]) == (2000.0, 3.0, 200.0)
    assert (r0["stall_p50_ns"], r0["stall_p99_ns"], r0["reset_p99_ns"]) == (
        1 << 21, 1 << 21, 1 << 16)
    assert [(r["pid"], r["index"], r["size"]) for r in obj["rings"]] == [
        (100, 0, 256), (100, 1, 256), (200, 0, None)]
    vm = obj["vms"][0]
    assert (vm["comm"], vm["name"], vm["ring_bytes"], vm["rings"], vm["pushes"]) == (
        "qemu-system-x86", "db1", 4096, 2, 5030)


def test_prometheus_text():
    _, b = two_snapshots()
    text = render_metrics(b)
    lines = text.splitlines()
    lab = 'pid="100",vm="5",vm_gen="0",ring="0",comm="qemu-system-x86"'
    assert f"kvmtrace_ring_pushes_total{{{lab}}} 5000" in lines
    assert f"kvmtrace_ring_soft_full_exits_total{{{lab}}} 10" in lines
    assert f"kvmtrace_ring_entries_reset_total{{{lab}}} 1600" in lines
    assert f"kvmtrace_ring_used_entries{{{lab}}} 128" in lines
    assert f"kvmtrace_ring_size_entries{{{lab}}} 256" in lines
    assert ('kvmtrace_ring_lost_entries_total{pid="200",vm="7",vm_gen="0",ring="0",'
            'comm="python3"} 44') in lines
    assert not any(ln.startswith('kvmtrace_ring_size_entries{pid="200"') for ln in lines)
    assert not any('ring="-1"' in ln and ln.startswith("kvmtrace_ring_") for ln in lines)
    buckets = [ln for ln in lines if ln.startswith(f"kvmtrace_ring_stall_seconds_bucket{{{lab}")]
    assert len(buckets) == HIST_BUCKETS
    assert buckets[19].endswith('le="0.001048576"} 0') and buckets[20].endswith("} 99")
    assert buckets[24].endswith("} 100") and buckets[-1].endswith('le="+Inf"} 100')
    assert f"kvmtrace_ring_stall_seconds_sum{{{lab}}} 0.1685" in lines
    assert f"kvmtrace_ring_stall_seconds_count{{{lab}}} 100" in lines
    assert ('kvmtrace_reset_latency_seconds_count{pid="100",vm="5",vm_gen="0",comm='
            '"qemu-system-x86"} 3') in lines
    assert "kvmtrace_lost_events_total 2" in lines
    assert ('kvmtrace_vm_info{pid="100",vm="5",vm_gen="0",comm="qemu-system-x86",name="db1",'
            'ring_bytes="4096"} 1') in lines
    assert sum(ln.startswith("# TYPE ") for ln in lines) == 17  # 3 of them: dirty rate
    assert f'kvmtrace_ring_stuck{{{lab},reason=""}} 0' in lines


def test_prometheus_scrape_over_http():
    _, b = two_snapshots()

    class Fake(SnapshotSource):
        meta = SourceMeta(kind="live")
        calls = 0

        def snapshot(self) -> Snapshot:
            Fake.calls += 1
            return b

    exp = Exporter(Fake(), "127.0.0.1", 0)
    exp.start()
    try:
        host, port = exp.address
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
            ctype = resp.headers["Content-Type"]
        assert body == render_metrics(b) and ctype.startswith("text/plain; version=0.0.4")
        assert Fake.calls == 1
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://{host}:{port}/nope", timeout=10)
    finally:
        exp.close()


def test_parse_listen():
    assert parse_listen(":9877") == ("127.0.0.1", 9877)
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("9877", "host:", "a:99999", "x:y"):
        with pytest.raises(UsageError):
            parse_listen(bad)


@pytest.mark.parametrize("argv", [
    ["-b", "-d", "abc"], ["-b", "-n", "0"], ["-b", "-p", "-3"], ["-b", "-s", "nope"],
    ["-b", "--ring-entries", "256"], ["-b", "--prometheus", "1.2.3.4"], [],
])
def test_cli_bad_input_is_one_line(argv):
    proc = subprocess.run(kvmtrace_cmd("top", *argv), capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("kvmtrace top: error: ")


# -- the CLI over the shared real-kernel samples (--replay: no kernel needed) -----------------
def run_top(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(kvmtrace_cmd("top", *argv), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_replay_batch_json_ftrace_sample(samples):
    proc = run_top("-b", "--json", "-d", "0.002", "--ring-bytes", "8192", "--replay",
                   str(samples / "ftrace-1vcpu-8192B-800pages.txt"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(lines) == 6  # 11.6 ms of trace in 2 ms steps
    (ring,) = lines[-1]["rings"]
    assert {k: ring[k] for k in ("index", "size", "pushes", "soft_full_exits", "resets",
                                 "entries_reset", "used", "max_used", "lost")} == {
        "index": 0, "size": 512, "pushes": 800, "soft_full_exits": 1, "resets": 2,
        "entries_reset": 800, "used": 0, "max_used": 448, "lost": 0}
    assert round(sum(ln["rings"][0]["push_rate"] * ln["interval_s"] for ln in lines)) == 800
    assert [ln["rings"][0]["resets"] for ln in lines] == [0, 0, 0, 1, 1, 2]
    assert all(ln["time"] is None for ln in lines)  # ftrace text has no wall-clock start


def test_replay_batch_text_perf_sample(samples):
    proc = run_top("-b", "-n", "2", "-d", "0.005", "--replay",
                   str(samples / "perf-script-3vcpu-4096B-400pages.txt"))
    assert proc.returncode == 0, proc.stderr
    screens = proc.stdout.split("\n\n")
    assert len([s for s in screens if s.strip()]) == 2
    for screen in screens[:2]:
        rows = [ln.split() for ln in screen.splitlines()]
        assert rows[0][:2] == ["kvmtrace", "top"] and "replay" in rows[0]
        assert sorted(r[0] for r in rows if r[0].startswith("vcpu")) == ["vcpu0", "vcpu1",
                                                                         "vcpu2"]
        assert all(r[1] == "?" for r in rows if r[0].startswith("vcpu"))  # size unknown
        assert all(len(ln) <= 80 for ln in screen.splitlines())


def test_replay_prometheus(samples):
    proc = subprocess.Popen(
        kvmtrace_cmd("top", "--prometheus", "127.0.0.1:0", "-d", "0.01", "--replay",
                     str(samples / "perf-script-3vcpu-4096B-400pages.txt")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first.startswith("kvmtrace top: serving http://127.0.0.1:"), first
        url = first.split()[-1]
        for _ in range(600):  # the file plays in real time: 12 ms of trace
            with urllib.request.urlopen(url, timeout=10) as resp:
                text = resp.read().decode()
            pushes = [ln for ln in text.splitlines()
                      if ln.startswith("kvmtrace_ring_pushes_total")]
            if [ln.split()[-1] for ln in pushes] == ["400"] * 3:
                break
            time.sleep(0.05)
        assert [ln.split("{")[1].split("}")[0] for ln in pushes] == [
            f'pid="0",vm="-1",vm_gen="0",ring="{r}",comm=""' for r in range(3)]
        assert [ln.split()[-1] for ln in pushes] == ["400"] * 3
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_replay_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "x.txt"
    bad.write_text("hello\n")
    proc = run_top("-b", "--replay", str(bad))
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def stuck_snapshots() -> tuple[Snapshot, Snapshot]:
    """VM (300, 4): ring 0 stuck after an overflow (3 overwritten + 41 stranded), ring 1
    healthy."""
    a = Snapshot(time_ns=10 * SEC)
    b = Snapshot(time_ns=11 * SEC)
    for snap in (a, b):
        snap.rings[RingKey(300, 4, 1)] = RingCounters(pushes=300, resets=2, entries_reset=300,
                                                      size=256)
    b.rings[RingKey(300, 4, 0)] = RingCounters(pushes=300, resets=2, entries_reset=256,
                                               dirty_index=300, reset_index=256, size=256,
                                               lost=44, stranded=41, stuck="stranded")
    b.vms[(300, 4)] = VmInfo(pid=300, vm=4, comm="qemu")
    return a, b


def test_stuck_ring_on_screen_json_and_metrics():
    a, b = stuck_snapshots()
    iv = compute_interval(a, b)
    lines = render_top(iv, 80, 24, "vm", hooks={"kvm_dirty_ring_push": "raw_tp"})
    assert lines[2] == "STUCK: 300:4 vcpu0 stranded"
    labels = [ln.split()[0] for ln in lines[HEADER_LINES + 1:]]
    assert labels == ["300:4!", "vcpu0!", "vcpu1"]
    obj = interval_json(iv)
    rings = {r["index"]: r for r in obj["rings"]}
    assert (rings[0]["stuck"], rings[0]["stuck_reason"], rings[0]["lost"],
            rings[0]["stranded"]) == (True, "stranded", 44, 41)
    assert (rings[1]["stuck"], rings[1]["stuck_reason"], rings[1]["stranded"]) == (
        False, None, 0)
    (vm,) = obj["vms"]
    assert (vm["stuck"], vm["stuck_reason"], vm["lost"], vm["stranded"]) == (
        True, "stranded", 44, 41)
    text = render_metrics(b).splitlines()
    lab = 'pid="300",vm="4",vm_gen="0",ring="0",comm="qemu"'
    assert f'kvmtrace_ring_stuck{{{lab},reason="stranded"}} 1' in text
    lab1 = lab.replace('ring="0"', 'ring="1"')
    assert f'kvmtrace_ring_stuck{{{lab1},reason=""}} 0' in text
    assert f"kvmtrace_ring_stranded_entries_total{{{lab}}} 41" in text
    assert f"kvmtrace_ring_lost_entries_total{{{lab}}} 44" in text
