"""``kvmtrace top --light`` (no probe on kvm_dirty_ring_push) against the built-in VMM.

Light mode learns a ring's pushes, used and overflow from the indices its
kvm_dirty_ring_reset events carry. The built-in VMM resets at every soft-full exit and once
at the end, after its vCPUs stopped, so the last reset of each ring sees every push and the
last interval's cumulative counters must equal the workload's ground truth exactly.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT, kvmtrace_cmd

from kvmtrace.bpf.loader import Probes
from kvmtrace.errors import UsageError

pytestmark = pytest.mark.kernel

BASE = ["--vcpus", "2", "--ring-bytes", "4096", "--pages", "1000", "--exit-every", "1", "--json"]
OVERFLOW = ["--vcpus", "1", "--ring-bytes", "4096", "--pages", "300", "--exit-every", "0",
            "--json"]


def top_light(*workload: str, hook: str = "auto", light: bool = True
              ) -> tuple[dict, list[dict]]:
    """``top -b --json --light -- kvmtrace workload ...``: (ground truth, NDJSON objects)."""
    mode = ["--light"] if light else []
    proc = subprocess.run(kvmtrace_cmd("top", "-b", "--json", *mode, "--hook", hook,
                                       "-d", "0.5", "--", *kvmtrace_cmd("workload", *workload)),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    truth = json.loads(proc.stderr)  # the command's stdout goes to top's stderr
    return truth, [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("hook", ["auto", "tp"])
def test_light_counts_equal_ground_truth(kvm, bpf_root, hook):
    """auto takes raw tracepoints here (the exit reads its ring's index); with tracepoints
    the exit only names the vcpu_id, which light mode takes as the ring index."""
    truth, lines = top_light(*BASE, hook=hook)
    assert {ln["mode"] for ln in lines} == {"light"}
    last = lines[-1]
    rings = sorted(last["rings"], key=lambda r: r["index"])
    assert [(r["pid"], r["vm"]) for r in rings] == [(truth["pid"], truth["vm_fd"])] * 2
    for r, t in zip(rings, truth["rings"], strict=True):
        assert r["index"] == t["index"]
        assert r["size"] == truth["ring_entries"] == 256  # from KVM_ENABLE_CAP
        assert r["pushes"] == t["pages_written"] == t["harvested"] == 1000
        assert r["soft_full_exits"] == t["soft_full_exits"] > 0
        assert r["resets"] == truth["resets"]  # every ioctl resets every ring
        assert r["entries_reset"] == t["entries_reset"] == 1000
        # on-full harvest: a ring is reset right after its own exit at used == soft limit
        # (its vCPU waits meanwhile), so the used-before-reset samples peak exactly there
        assert r["max_used"] == truth["soft_limit"] == 192
        assert (r["lost"], r["used"]) == (0, 0)
        assert sum(r["stall_hist"]) == t["soft_full_exits"]  # stalls still per ring
    # push/s per interval is the dirty_index advance seen at that interval's resets
    total = sum(r["push_rate"] * ln["interval_s"] for ln in lines for r in ln["rings"])
    assert round(total) == 2000
    (vm,) = last["vms"]
    assert (vm["ring_bytes"], vm["rings"], vm["pushes"]) == (4096, 2, 2000)


@pytest.mark.parametrize("mode", ["light", "full"])
def test_overflow_counts_overwritten_entries(kvm, bpf_root, mode):
    """Tight loop, 300 pushes into a 256-entry ring, no harvest until a soft-full exit or
    the end. Every run is exact against the VMM's own count of pages it never harvested
    (lost_suspected); which of three shapes a run takes depends on where the host's timer
    tick lands after push 192 (the soft limit), so each run's shape is read from the VMM:

    - no soft-full exit: one reset at the end with dirty_index 300 and reset_index 0, so
      dirty - reset - size = 44 entries were overwritten, none stranded;
    - a soft-full exit after push 256: the harvest collects a whole lap and the reset stops
      on an entry it cleared, so every later push is stranded; lost = overwritten + stranded
      = 44 again;
    - a soft-full exit before push 256: nothing lost.

    The test ends at the first run of the first shape, and fails if no run of 16 lost a
    page at all (the first two shapes need 64 pushes without a tick: most runs on a 250 Hz
    host). Full mode counts the same from its indices at resets (and between resets in user
    space), with its pushes counted live by the push program's fast path."""
    shapes = []
    for _attempt in range(16):
        truth, lines = top_light(*OVERFLOW, light=mode == "light")
        assert {ln["mode"] for ln in lines} == {mode}
        (t,) = truth["rings"]
        (r,) = lines[-1]["rings"]
        assert r["size"] == 256 and r["pushes"] == t["pages_written"] == 300
        assert r["resets"] == truth["resets"]
        assert r["entries_reset"] == t["entries_reset"]
        assert r["lost"] == t["lost_suspected"]
        assert lines[-1]["vms"][0]["lost"] == t["lost_suspected"]
        shapes.append((t["soft_full_exits"], t["lost_suspected"]))
        if t["lost_suspected"] and t["soft_full_exits"] == 0:
            assert truth["resets"] == 1 and r["max_used"] == 300
            assert (r["lost"], r["stranded"]) == (300 - 256, 0)
            return
    assert any(lost for _exits, lost in shapes), f"no run overflowed: {shapes}"
    assert {lost for _exits, lost in shapes} <= {0, 300 - 256}


def test_light_attaches_nothing_to_push(bpf_root):
    with Probes("top-light") as probes:
        assert probes.mode == "top-light" and "kvm_dirty_ring_push" not in probes.hooks
        bpf = probes._bpf
        attached = [*bpf.raw_tracepoint_fds, *bpf.tracepoint_fds]
        assert b"kvm_dirty_ring_reset" in attached or b"kvm:kvm_dirty_ring_reset" in attached
        assert not [name for name in attached if b"push" in name]


def test_light_refuses_event_output():
    with pytest.raises(UsageError, match="push probe"):
        Probes("top-light", with_events=True)


def test_light_header_and_json_say_the_mode():
    from kvmtrace.analysis.rates import compute_interval
    from kvmtrace.core.counters import Snapshot
    from kvmtrace.views.top_render import render_top
    from kvmtrace.views.topjson import interval_json

    iv = compute_interval(None, Snapshot(time_ns=1))
    light = render_top(iv, 80, 24, mode="light", hooks={"kvm_dirty_ring_reset": "raw_tp"})
    assert "  live light  " in light[0]
    assert light[2].startswith("light: push/used as of the last reset; hooks: raw_tp reset")
    full = render_top(iv, 80, 24, hooks={"kvm_dirty_ring_reset": "raw_tp"})
    assert "light" not in "\n".join(full) and full[2] == "hooks: raw_tp reset"
    assert (interval_json(iv, mode="light")["mode"], interval_json(iv)["mode"]) == (
        "light", "full")
