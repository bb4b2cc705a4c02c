"""``kvmtrace top`` against the built-in VMM on the real kernel (fixtures kvm + bpf_root).

Every top here filters by the pid of its own workload (``-p``). The pid is known before the
VM exists: a holder process starts first, ``top -p HOLDER`` attaches (its first output line
says it is ready), then the holder ``exec``s the workload, which keeps the pid. So the VM
always starts after ``top``, and the ring size must come from KVM_ENABLE_CAP.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import pytest
from conftest import ROOT, kvmtrace_cmd, require, require_kvm_bpf

from kvmtrace.core.counters import HIST_BUCKETS, hist_percentile

pytestmark = pytest.mark.kernel

HOLD = "import os, sys; sys.stdin.read(1); os.execv(sys.executable, sys.argv[1:])"
BASE = ["--vcpus", "2", "--ring-bytes", "4096", "--pages", "1000", "--exit-every", "1", "--json"]
DELAY_US = 20_000  # injected before each harvest: every stall is at least this long


def held(workload_args: list[str]) -> subprocess.Popen:
    """A process that becomes ``kvmtrace workload ...`` (same pid) once released."""
    argv = [sys.executable, "-c", HOLD, *kvmtrace_cmd("workload", *workload_args)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)


def release(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"g")
    proc.stdin.flush()


class Lines:
    """Lines of a pipe, read by a thread, handed out with a timeout."""

    def __init__(self, pipe) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe) -> None:
        for line in pipe:
            self.q.put(line)
        self.q.put(None)

    def get(self, timeout: float = 60.0) -> str:
        line = self.q.get(timeout=timeout)
        assert line is not None, "top ended early"
        return line


@dataclass
class Run:
    truth: dict
    lines: list[dict]
    final: dict = field(default_factory=dict)  # the last interval holding our rings
    scraped: str = ""


def run_with_top(workload_args: list[str], *, prometheus: bool = False) -> Run:
    wl = held(workload_args)
    extra = ["--prometheus", "127.0.0.1:0"] if prometheus else []
    top = subprocess.Popen(
        kvmtrace_cmd("top", "-b", "--json", "-p", str(wl.pid), "-d", "1", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        url = ""
        if prometheus:
            err = Lines(top.stderr).get()
            assert err.startswith("kvmtrace top: serving http://127.0.0.1:"), err
            url = err.split()[-1]
        out = Lines(top.stdout)
        lines = [json.loads(out.get())]  # attached and counting
        assert lines[0]["rings"] == []
        release(wl)
        stdout, stderr = wl.communicate(timeout=120)
        assert wl.returncode == 0, stderr
        truth = json.loads(stdout)
        scraped = ""
        while True:  # until the exited VMM's rows go away (or 3 intervals after its end)
            lines.append(json.loads(out.get()))
            if prometheus and lines[-1]["rings"] and not scraped:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    scraped = resp.read().decode()
            seen = [i for i, ln in enumerate(lines) if ln["rings"]]
            if seen and (not lines[-1]["rings"] or len(lines) - seen[-1] > 3):
                break
        final = lines[seen[-1]]
        return Run(truth, lines, final, scraped)
    finally:
        top.terminate()
        top.wait(timeout=30)
        if wl.poll() is None:
            wl.kill()
            wl.wait()


def check_ground_truth(run: Run) -> None:
    truth, final = run.truth, run.final
    rings = {r["index"]: r for r in final["rings"]}
    assert sorted(rings) == [r["index"] for r in truth["rings"]]
    for gt in truth["rings"]:
        r = rings[gt["index"]]
        assert (r["pid"], r["vm"]) == (truth["pid"], truth["vm_fd"])
        assert r["size"] == truth["ring_entries"]
        assert r["pushes"] == gt["harvested"]
        assert r["soft_full_exits"] == gt["soft_full_exits"]
        assert r["entries_reset"] == gt["entries_reset"] == gt["harvested"]
        assert r["resets"] == truth["resets"]  # every ioctl resets every ring
        assert (r["lost"], r["used"]) == (0, 0)
        assert sum(r["stall_hist"]) == gt["soft_full_exits"]
    (vm,) = final["vms"]
    assert (vm["ring_bytes"], vm["rings"]) == (truth["ring_bytes"], truth["vcpus"])
    assert vm["pushes"] == sum(r["harvested"] for r in truth["rings"])


@pytest.fixture(scope="module")
def default_run() -> Run:
    require_kvm_bpf()
    return run_with_top(BASE, prometheus=True)


def test_cumulative_counts_equal_ground_truth(default_run: Run):
    check_ground_truth(default_run)
    truth = default_run.truth
    for r in default_run.final["rings"]:
        assert r["max_used"] == truth["soft_limit"]  # exits exactly at the soft limit
    # the per-interval push rates add up to the pushes (rate * interval per line)
    total = sum(r["push_rate"] * ln["interval_s"] for ln in default_run.lines
                for r in ln["rings"])
    assert round(total) == sum(r["harvested"] for r in truth["rings"])


def test_prometheus_scrape_equals_ground_truth(default_run: Run):
    text = default_run.scraped.splitlines()
    truth = default_run.truth
    for gt in truth["rings"]:
        sel = f'pid="{truth["pid"]}",vm="{truth["vm_fd"]}",vm_gen="0",ring="{gt["index"]}"'
        values = {ln.split("{")[0]: int(float(ln.split()[-1])) for ln in text
                  if sel in ln and "_bucket" not in ln}
        assert values["kvmtrace_ring_pushes_total"] == gt["harvested"]
        assert values["kvmtrace_ring_soft_full_exits_total"] == gt["soft_full_exits"]
        assert values["kvmtrace_ring_entries_reset_total"] == gt["entries_reset"]
        assert values["kvmtrace_ring_size_entries"] == truth["ring_entries"]
        assert values["kvmtrace_ring_stall_seconds_count"] == gt["soft_full_exits"]


def _stall_p50(run: Run) -> int:
    hist = [sum(r["stall_hist"][i] for r in run.final["rings"]) for i in range(HIST_BUCKETS)]
    p50 = hist_percentile(hist, 0.5)
    assert p50 is not None
    return p50


def test_stalls_longer_with_harvest_delay(default_run: Run):
    slow = run_with_top([*BASE, "--harvest-delay-us", str(DELAY_US)])
    check_ground_truth(slow)
    floor_bucket = (DELAY_US * 1000).bit_length() - 1  # 20 ms lies in bucket 24
    for r in slow.final["rings"]:
        assert sum(r["stall_hist"][:floor_bucket]) == 0  # no stall below the injected delay
        assert r["stall_ns"] >= r["soft_full_exits"] * DELAY_US * 1000
    assert _stall_p50(slow) > _stall_p50(default_run)


def test_stalls_longer_with_lazy_harvest(default_run: Run):
    lazy = run_with_top([*BASE, "--harvest", "lazy", "--reaper-ms", "20"])
    check_ground_truth(lazy)
    per_stall = [sum(r["stall_ns"] for r in run.final["rings"])
                 / sum(r["soft_full_exits"] for r in run.final["rings"])
                 for run in (lazy, default_run)]
    assert per_stall[0] > 4 * per_stall[1], per_stall  # ~10 ms (reaper) vs ~0.1-1 ms


def _screen(sock: str, target: str) -> str:
    return subprocess.run(["tmux", "-L", sock, "capture-pane", "-p", "-t", target],
                          capture_output=True, text=True, check=True).stdout


def _wait_screen(sock: str, target: str, *needles: str, timeout: float = 60) -> str:
    end = time.monotonic() + timeout
    while True:
        screen = _screen(sock, target)
        if all(n in screen for n in needles):
            return screen
        assert time.monotonic() < end, f"never saw {needles} on:\n{screen}"
        time.sleep(0.2)


def test_interactive_in_tmux(kvm, bpf_root, tmp_path):
    require(shutil.which("tmux") is not None,
            "tmux not installed (tools/setup.sh --test installs it)")
    wl = held([*BASE, "--duration", "4"])
    sock, target = f"kvmtrace-test-{os.getpid()}", "top"
    rc_file = tmp_path / "rc"
    cmd = " ".join(kvmtrace_cmd("top", "-p", str(wl.pid), "-d", "0.5"))
    try:
        subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-s", target, "-x", "80",
                        "-y", "24", f"cd {ROOT} && {cmd}; echo $? > {rc_file}"], check=True)
        _wait_screen(sock, target, f"Waiting for pid {wl.pid}", "sort push")
        release(wl)
        screen = _wait_screen(sock, target, "  vcpu0", "  vcpu1")
        rows = [ln.split() for ln in screen.splitlines()]
        assert ["VM/VCPU", "SIZE", "USED", "FIL%", "MAXU", "PUSH/s", "MB/s", "EXIT/s",
                "STL99", "RST/s", "RST99", "LOST"] in rows
        vcpus = [r for r in rows if r and r[0] in ("vcpu0", "vcpu1")]
        assert [r[1] for r in vcpus] == ["256", "256"]  # ring size learnt from ENABLE_CAP
        assert any(r and r[0].startswith(f"{wl.pid}:") for r in rows)  # the VM total row
        subprocess.run(["tmux", "-L", sock, "send-keys", "-t", target, "s"], check=True)
        _wait_screen(sock, target, "sort exit v")
        subprocess.run(["tmux", "-L", sock, "send-keys", "-t", target, "<", "<"], check=True)
        _wait_screen(sock, target, "sort max v")  # exit -> push -> max
        subprocess.run(["tmux", "-L", sock, "send-keys", "-t", target, "h"], check=True)
        _wait_screen(sock, target, "reset counters")
        subprocess.run(["tmux", "-L", sock, "send-keys", "-t", target, "x", "q"], check=True)
        end = time.monotonic() + 30
        while not (rc_file.exists() and rc_file.read_text().strip()):
            assert time.monotonic() < end, "top did not quit on q"
            time.sleep(0.1)
        assert rc_file.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
        if wl.poll() is None:
            wl.kill()
        wl.wait()


def test_batch_follows_a_command_to_its_end(kvm, bpf_root):
    """``top -b --json -- WORKLOAD``: stdout is NDJSON only (the command's output goes to
    stderr), the last interval is the one in which the command exited, and it holds the
    workload's ground truth exactly."""
    proc = subprocess.run(kvmtrace_cmd("top", "-b", "--json", "-d", "0.5", "--",
                                       *kvmtrace_cmd("workload", *BASE)),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    truth = json.loads(proc.stderr)
    last = json.loads(proc.stdout.splitlines()[-1])
    rings = sorted(last["rings"], key=lambda r: r["index"])
    assert [r["pid"] for r in rings] == [truth["pid"]] * 2
    for r, t in zip(rings, truth["rings"], strict=True):
        assert r["size"] == truth["ring_entries"] == 256
        assert r["pushes"] == t["harvested"] == 1000
        assert r["soft_full_exits"] == t["soft_full_exits"]
        assert r["entries_reset"] == t["entries_reset"] == 1000
        assert r["lost"] == 0


def test_interactive_command_shows_its_output_after_quit(kvm, bpf_root):
    """The README's main job: ``top -- workload`` in an 80x24 terminal; after q the
    workload's own summary appears on the terminal."""
    require(shutil.which("tmux") is not None,
            "tmux not installed (tools/setup.sh --test installs it)")
    sock, target = f"kvmtrace-test-cmd-{os.getpid()}", "top"
    cmd = " ".join(kvmtrace_cmd("top", "-d", "0.5", "--",
                                *kvmtrace_cmd("workload", *BASE[:-1], "--duration", "2")))
    try:
        subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-s", target, "-x", "80",
                        "-y", "24", f"cd {ROOT} && {cmd}; echo rc=$?; sleep 60"], check=True)
        screen = _wait_screen(sock, target, "  vcpu0", "  vcpu1", "command exited with status 0")
        vcpus = [ln.split() for ln in screen.splitlines()
                 if ln.split()[:1] in (["vcpu0"], ["vcpu1"])]
        assert [r[1] for r in vcpus] == ["256", "256"]
        subprocess.run(["tmux", "-L", sock, "send-keys", "-t", target, "q"], check=True)
        screen = _wait_screen(sock, target, "rc=0", timeout=30)
        assert "kvmtrace workload: pid" in screen and "harvest on-full" in screen
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)


OVERFLOW = ["--vcpus", "1", "--ring-bytes", "4096", "--exit-every", "0", "--json"]


def top_command(*workload: str, light: bool, delay: str = "0.5") -> tuple[dict, list[dict]]:
    """``top -b --json [--light] -d DELAY -- kvmtrace workload ...``: (the workload's ground
    truth, top's NDJSON objects)."""
    mode = ["--light"] if light else []
    proc = subprocess.run(kvmtrace_cmd("top", "-b", "--json", *mode, "-d", delay, "--",
                                       *kvmtrace_cmd("workload", *workload)),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stderr), [json.loads(ln) for ln in proc.stdout.splitlines()]


def check_overflow_run(truth: dict, lines: list[dict]) -> None:
    """Per ring: top's lost (overwritten + stranded) equals the pages the VMM wrote and never
    harvested; stuck exactly when the ring lost pages or livelocked; flagged no later than
    the first interval that shows a loss."""
    rings = {r["index"]: r for r in lines[-1]["rings"]}
    for t in truth["rings"]:
        r = rings.get(t["index"])
        if r is None:  # a vCPU stopped before its first push
            assert t["pages_written"] == 0
            continue
        assert r["pushes"] == t["pages_written"]
        assert r["entries_reset"] == t["entries_reset"] == t["harvested"]
        assert r["lost"] == t["lost_suspected"], (r, t)
        assert r["stuck"] == bool(t["lost_suspected"] or t["livelock"]), (r, t)
        if t["livelock"]:
            assert r["stuck_reason"] in ("stranded", "no_reset_progress")
        elif t["lost_suspected"]:  # stranded, or recovered a lap behind with pages lost
            assert r["stuck_reason"] in ("stranded", "overflow")
        first = next((x for ln in lines for x in ln["rings"]
                      if x["index"] == t["index"] and x["lost"]), None)
        assert first is None or first["stuck"]
    (vm,) = lines[-1]["vms"]
    assert vm["lost"] == truth["lost_suspected"]


@pytest.mark.parametrize("light", [False, True], ids=["full", "light"])
@pytest.mark.parametrize(("pages", "vcpus"), [(300, 1), (3000, 1), (3000, 4)])
def test_overflow_lost_equals_the_vmm_and_stuck_is_flagged(kvm, bpf_root, light, pages,
                                                           vcpus):
    """A tight guest loop overflows 256-entry rings (COMMON.md decision 2). 300 pages: the
    VMM resets once at the end (44 overwritten) or after one soft-full exit (a few
    overwritten, the rest stranded), or the exit comes in time (nothing lost). 3000 pages:
    the VMM harvests by index after the overflow and livelocks; the pushes may wrap past the
    stuck entry several times. Three runs each (the outcome varies with timing)."""
    for _run in range(3):
        truth, lines = top_command(*OVERFLOW[2:], "--vcpus", str(vcpus), "--pages", str(pages),
                                   light=light)
        check_overflow_run(truth, lines)


LIVELOCK_THEN_WAIT = """
import json, os, sys, time
from kvmtrace.vmm.workload import WorkloadConfig, run_workload
sys.stdin.read(1)
res = run_workload(WorkloadConfig(vcpus=1, ring_bytes=4096, pages=3000, exit_every=0))
out = res.to_dict()
out["end_time"] = time.time()
print(json.dumps(out), flush=True)
time.sleep(3)
"""


@pytest.mark.parametrize("light", [False, True], ids=["full", "light"])
def test_stuck_ring_shown_within_two_refreshes(kvm, bpf_root, light):
    """``top -p PID -b --json -d 0.5`` on a VMM that livelocks after an overflow and then
    stays alive: at the latest the second interval after the livelock ended the run shows
    the ring stuck, with lost equal to the pages the VMM never harvested."""
    wl = subprocess.Popen([sys.executable, "-c", LIVELOCK_THEN_WAIT], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, cwd=ROOT)
    mode = ["--light"] if light else []
    top = subprocess.Popen(kvmtrace_cmd("top", "-b", "--json", *mode, "-p", str(wl.pid),
                                        "-d", "0.5"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out = Lines(top.stdout)
        assert json.loads(out.get())["rings"] == []  # attached
        assert wl.stdin is not None and wl.stdout is not None
        wl.stdin.write("g")
        wl.stdin.flush()
        truth = json.loads(wl.stdout.readline())
        assert truth["livelock"]
        (t,) = truth["rings"]
        after: list[dict] = []
        while len(after) < 2:
            line = json.loads(out.get())
            if line["time"] >= truth["end_time"]:
                after.append(line)
        (r,) = after[-1]["rings"]
        assert r["stuck"] and r["stuck_reason"] in ("stranded", "no_reset_progress")
        assert (r["lost"], r["pushes"]) == (t["lost_suspected"], t["pages_written"])
    finally:
        top.terminate()
        top.wait(timeout=30)
        wl.kill()
        wl.wait()


def test_stuck_ring_on_the_interactive_screen(kvm, bpf_root):
    """The curses view in an 80x24 tmux pane: a livelocked ring's row is marked ``vcpu0!``
    and line 3 says ``STUCK: PID:VM vcpu0 REASON``."""
    require(shutil.which("tmux") is not None,
            "tmux not installed (tools/setup.sh --test installs it)")
    wl = subprocess.Popen([sys.executable, "-c", LIVELOCK_THEN_WAIT.replace("sleep(3)",
                                                                             "sleep(30)")],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    sock, target = f"kvmtrace-test-stuck-{os.getpid()}", "top"
    cmd = " ".join(kvmtrace_cmd("top", "-p", str(wl.pid), "-d", "0.5"))
    try:
        subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-s", target, "-x", "80",
                        "-y", "24", f"cd {ROOT} && {cmd}"], check=True)
        _wait_screen(sock, target, f"Waiting for pid {wl.pid}")
        assert wl.stdin is not None and wl.stdout is not None
        wl.stdin.write("g")
        wl.stdin.flush()
        truth = json.loads(wl.stdout.readline())
        screen = _wait_screen(sock, target, "vcpu0!", "STUCK:")
        (stuck,) = [ln for ln in screen.splitlines() if ln.startswith("STUCK:")]
        assert stuck.split()[1:3] == [f"{truth['pid']}:{truth['vm_fd']}", "vcpu0"]
        assert stuck.split()[3] in ("stranded", "no_reset_progress")
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
        wl.kill()
        wl.wait()
