"""The built-in VMM on real KVM: exact per-ring ground truth, overflow, livelock, bad flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import kvmtrace_cmd

from kvmtrace.errors import MissingFeature, UsageError
from kvmtrace.host import kvm as kvm_mod
from kvmtrace.host.kvm import RingCaps
from kvmtrace.vmm import vm as vm_mod
from kvmtrace.vmm.workload import LIVELOCK_EXITS, WorkloadConfig, run_workload

pytestmark = pytest.mark.kernel


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd("workload", *args), capture_output=True, text=True,
                          timeout=timeout)


def test_two_vcpus_exit_every_page(kvm, tmp_path):
    """2 vCPUs x 1000 pages, 256-entry ring (soft limit 192), I/O exit after every write,
    on-full harvesting: the ring reaches 192 used, the next entry gives exit 31, the vCPU
    harvests exactly 192 and resets, so 1000 pushes give floor(1000 / 192) = 5 exits per
    ring; 40 entries per ring are left for the final harvest."""
    dump = tmp_path / "harvest.json"
    proc = run_cli("--vcpus", "2", "--ring-bytes", "4096", "--pages", "1000",
                   "--exit-every", "1", "--harvest", "on-full", "--json",
                   "--dump-harvest", str(dump))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["vcpus"] == 2 and res["ring_bytes"] == 4096 and res["ring_entries"] == 256
    assert res["cap"] in (192, 223)
    assert res["pid"] > 0 and res["vm_fd"] >= 3
    assert res["livelock"] is False and res["lost_suspected"] == 0
    assert res["resets"] == 2 * 5 + 1  # one per exit-31 harvest, one final
    assert res["reset_returned"] == res["entries_reset"] == 2000
    assert [r["index"] for r in res["rings"]] == [0, 1]
    for ring in res["rings"]:
        assert ring["pages_written"] == 1000
        assert ring["harvested"] == 1000 and ring["distinct"] == 1000
        assert ring["soft_full_exits"] == 1000 // 192 == 5
        assert ring["entries_reset"] == 1000
        assert ring["lost_suspected"] == 0 and ring["unexpected"] == 0
        assert ring["halted"] is True and ring["livelock"] is False
        assert ring["exits"] == {"io": 1000, "dirty_ring_full": 5, "hlt": 1}
        assert ring["kvm_runs"] == 1006
        assert ring["tid"] > 0 and ring["run_ns"] > ring["stall_ns"] >= 0
    data = json.loads(dump.read_text())
    assert data["pid"] == res["pid"] and data["vm_fd"] == res["vm_fd"]
    for i, ring in enumerate(data["rings"]):
        assert ring["index"] == i
        assert len(ring["harvested"]) == res["rings"][i]["harvested"]
        first = 0x100 + 1000 * i  # seq pattern, harvest order = push order
        assert ring["harvested"] == [[0, first + n] for n in range(1000)]


def test_tight_loop_overflows_ring(kvm):
    """300 writes, no exits, 256-entry ring: the kernel overwrites slots 0..43, so 44 pages
    are lost. If a host interrupt made the vCPU re-enter (and take exit 31) before the
    ring wrapped, nothing is lost; retry until a run overflowed, checking every run."""
    overflowed = None
    for _ in range(6):
        res = run_workload(WorkloadConfig(vcpus=1, ring_bytes=4096, pages=300,
                                          exit_every=0, keep_harvest=True))
        ring = res.rings[0]
        assert ring.pages_written == 300 and ring.halted and not res.livelock
        assert ring.unexpected == 0
        if ring.lost_suspected == 0:  # exit 31 came in time: everything harvested
            assert ring.soft_full_exits >= 1 and ring.harvested == ring.distinct == 300
            continue
        assert ring.lost_suspected == 44 == res.lost_suspected
        assert ring.harvested == ring.distinct == 256
        if ring.soft_full_exits == 0:  # no interrupt at all: one final harvest of 256
            assert res.harvest_log is not None
            assert [off for _, off in res.harvest_log[0]] == (
                [0x100 + p for p in range(256, 300)] + [0x100 + p for p in range(44, 256)])
        overflowed = res
        break
    assert overflowed is not None, "no run overflowed the ring in 6 tries"


def test_livelock_is_detected_and_ends_run(kvm):
    """1000 writes with no exits into a 256-entry ring: after the overflow, exit 31 keeps
    coming with nothing to harvest; the run must stop and say so."""
    res = run_workload(WorkloadConfig(vcpus=1, ring_bytes=4096, pages=1000, passes=3,
                                      exit_every=0))
    ring = res.rings[0]
    assert res.livelock is True and ring.livelock is True and ring.halted is False
    assert ring.soft_full_exits >= LIVELOCK_EXITS
    assert ring.lost_suspected == min(ring.pages_written, 1000) - ring.distinct
    assert ring.harvested <= ring.pages_written < 3000


def test_lazy_and_reaper_harvest_everything(kvm):
    for mode in ("lazy", "reaper"):
        res = run_workload(WorkloadConfig(vcpus=2, pages=1000, harvest=mode, reaper_ms=20,
                                          harvest_delay_us=50))
        assert not res.livelock
        assert res.reset_returned == res.entries_reset == 2000
        for ring in res.rings:
            assert (ring.pages_written, ring.harvested, ring.distinct) == (1000, 1000, 1000)
            assert ring.lost_suspected == 0 and ring.entries_reset == 1000


def test_progress_lines_end_at_the_result(kvm):
    """--progress-ms: NDJSON lines on stderr, one per period and one after the last
    harvest, whose counts are the run's own: the last line's harvested per ring is the
    result's (3 passes over 1000 pages, every write harvested), counts never go back."""
    proc = run_cli("--vcpus", "2", "--pages", "1000", "--passes", "3", "--harvest", "reaper",
                   "--reaper-ms", "5", "--progress-ms", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    lines = [json.loads(x) for x in proc.stderr.splitlines()]
    assert lines and all(x["progress"] == 1 for x in lines)
    keys = [[(r["vm"], r["index"]) for r in x["rings"]] for x in lines]
    assert keys == [[(0, 0), (0, 1)]] * len(lines)
    last = [r["harvested"] for r in lines[-1]["rings"]]
    assert last == [r["harvested"] for r in result["rings"]] == [3000, 3000]
    for a, b in zip(lines, lines[1:], strict=False):
        assert b["t_ns"] > a["t_ns"]
        assert all(rb["harvested"] >= ra["harvested"]
                   for ra, rb in zip(a["rings"], b["rings"], strict=True))


def _tight_loop_push_rate() -> float:
    """Guest writes per second of this host's tight loop (--exit-every 0), measured by a
    run that halts on its own: 20 passes over 1000 pages fit a 1 MiB ring's soft limit."""
    res = run_workload(WorkloadConfig(vcpus=1, ring_bytes=1 << 20, pages=1000, passes=20,
                                      exit_every=0))
    ring = res.rings[0]
    assert ring.halted and ring.pages_written == 20_000
    return ring.pages_written * 1e9 / ring.run_ns


def test_duration_stops_tight_loop_with_signal(kvm):
    """--duration ends a guest that never exits by itself: the stop signal is the one exit
    (intr), nothing is lost. The duration is a quarter of the time this host needs to fill
    the soft limit of a 1 MiB ring (65472 entries), so no exit 31 can come first on a fast
    host either (a slow host writes fewer pages: at least one pass is still needed)."""
    soft_limit = (1 << 20) // 16 - 64
    rate = _tight_loop_push_rate()
    duration = max(0.25 * soft_limit / rate, 4 * 1000 / rate)
    res = run_workload(WorkloadConfig(vcpus=1, ring_bytes=1 << 20, pages=1000,
                                      duration_s=duration, exit_every=0))
    ring = res.rings[0]
    assert res.passes == 0 and not ring.halted and not res.livelock
    assert ring.exits == {"intr": 1}, (ring.exits, ring.pages_written, rate)
    assert ring.distinct == 1000 and ring.lost_suspected == 0 and ring.lost_pages == []
    assert ring.harvested == ring.entries_reset <= ring.pages_written


def test_hot_and_random_patterns_cover_all_pages(kvm):
    for pattern in ("hot", "random"):
        res = run_workload(WorkloadConfig(vcpus=2, pages=500, pattern=pattern, seed=7,
                                          exit_every=4, passes=2))
        per_pass = 1000 if pattern == "hot" else 500
        for ring in res.rings:
            assert ring.pages_written == 2 * per_pass
            assert ring.distinct == 500 and ring.lost_suspected == 0
            assert ring.exits["io"] == 2 * per_pass // 4


@pytest.mark.parametrize("args,needle", [
    (["--ring-bytes", "5000"], "power of two"),
    (["--ring-bytes", "2048"], "power of two"),
    (["--ring-entries", "100"], "power of two"),
    (["--ring-bytes", str(1 << 30)], "maximum"),
    (["--pages", "1000000"], "MiB of guest memory"),
    (["--vcpus", "0"], "--vcpus"),
    (["--passes", "0"], "--passes"),
    (["--pattern", "zipf"], "--pattern"),
    (["--harvest", "eager"], "--harvest"),
    (["--passes", "2", "--duration", "1"], "exclusive"),
    (["--ring-bytes", "4096", "--ring-entries", "256"], "exclusive"),
    (["--vms", "0"], "--vms"),
    (["--vms", "17"], "--vms"),
    (["--vm-cycles", "0"], "--vm-cycles"),
    (["--migrate-ms", "0"], "--migrate-ms"),
    (["--progress-ms", "0"], "--progress-ms"),
])
def test_bad_flags_one_line_exit_2(kvm, args, needle):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("kvmtrace workload: error: ") and needle in lines[0]


def test_missing_dev_kvm(monkeypatch, tmp_path):
    monkeypatch.setattr(kvm_mod, "KVM_DEV", str(tmp_path / "no-kvm"))
    with pytest.raises(MissingFeature, match="does not exist"):
        run_workload(WorkloadConfig())


def test_missing_dirty_ring_cap(kvm, monkeypatch):
    monkeypatch.setattr(vm_mod, "probe_ring_caps", lambda fd: RingCaps(0, 0))
    with pytest.raises(MissingFeature, match="no dirty ring"):
        run_workload(WorkloadConfig())


def test_ring_above_kernel_max_library(kvm):
    with pytest.raises(UsageError, match="maximum"):
        run_workload(WorkloadConfig(ring_bytes=1 << 30))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_run_like_duration(kvm, signum, tmp_path):
    """SIGTERM/SIGINT (how `top -- workload` quits its child, and Ctrl-C) stop the vCPUs,
    harvest the rings a last time and still print the result, exit 0: nothing is lost."""
    pid_file = tmp_path / "pid"
    proc = subprocess.Popen(kvmtrace_cmd("workload", "--vcpus", "2", "--ring-bytes", "4096",
                                         "--pages", "2000", "--exit-every", "1",
                                         "--duration", "60", "--json",
                                         "--pid-file", str(pid_file)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the end handlers are set just after the vCPU threads start (a loaded host may take
    # seconds to get there): wait for the two vCPU threads, then give them 1.5 s to run
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(os.listdir(f"/proc/{proc.pid}/task")) >= 3 and pid_file.exists():
                break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    time.sleep(1.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    res = json.loads(out)
    assert res["interrupted"] == signal.Signals(signum).name
    assert res["wall_ns"] < 30e9 and res["reset_returned"] == res["entries_reset"]
    for ring in res["rings"]:
        assert ring["pages_written"] >= 2000  # 1.5 s is many passes
        assert ring["distinct"] == 2000
        assert ring["lost_suspected"] == 0 and ring["unexpected"] == 0
        assert ring["harvested"] == ring["entries_reset"] <= ring["pages_written"]


def test_help_lists_scenario_flags_within_80_columns():
    proc = run_cli("-h")
    assert proc.returncode == 0
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    examples = proc.stdout.split("examples:")[1]
    for flag in ("--vms", "--vm-cycles", "--migrate-ms", "--interrupt-resets"):
        assert f"  {flag}" in proc.stdout and flag in examples
