"""QEMU as a peer: kvmtrace's dirty rate (MB/s per vCPU) against QEMU's own
``calc-dirty-rate`` (mode ``dirty-ring``) on QEMU's window, 1 and 2 vCPUs.

QEMU's window: QEMU pushes to its rings only while dirty logging is on, and here only
``calc-dirty-rate`` turns it on; QEMU counts the entries it harvests from its log start to
its final reap (a KVM_RESET_DIRTY_RINGS right before it stops logging) and divides by its
calc-time (2000 ms, not the time logging was on). In the recording the window is found on
the clock both sides share (CLOCK_MONOTONIC: BPF's ktime and the test's QMP timestamps):
every push lies between the calc-dirty-rate command and QEMU's "measured"; the window ends
at the last ring reset before "measured". kvmtrace's MB/s on QEMU's window is the ring's
pushes in it x 4096 / 2**20 over calc-time, rounded as QEMU rounds (MiB truncated, then
MiB/s truncated), and must be within 1 % of QEMU's ``vcpu-dirty-rate``. ``replay``'s own
``dirty_rate_mbps`` (over the ring's first to last push) is shown beside it: it differs
from QEMU's by as much as QEMU's calculation overran its calc-time (0.2-1 % measured).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
from conftest import kvmtrace_cmd, require, require_kvm_bpf

from kvmtrace.core.events import Kind
from kvmtrace.source.recording import open_recording
from kvmtrace.testing.qemu import (
    Qemu,
    compare_with_qemu,
    qemu_binary,
    qemu_mbps,
    record_calc_dirty_rate,
)
from kvmtrace.vmm.multiboot import MultibootGuest

CALC_S = 2
MIN_MBPS = 40  #: the guest ran: a QEMU livelocked after an overflow reports 8-23 MB/s


def require_qemu() -> None:
    """QEMU and the qemu.qmp package: tools/setup.sh --test installs both."""
    require(qemu_binary() is not None,
            "qemu-system-x86_64 is not installed (tools/setup.sh --test installs it)")
    require(importlib.util.find_spec("qemu.qmp") is not None,
            "the qemu.qmp package is not installed (tools/setup.sh --test installs it)")


@pytest.fixture
def qemu_ok() -> None:
    require_kvm_bpf()
    require_qemu()


@pytest.mark.kernel
@pytest.mark.parametrize("vcpus", [1, 2])
def test_dirty_rate_agrees_with_qemu(tmp_path, qemu_ok, vcpus):
    guest = MultibootGuest(vcpus=vcpus, pages=16384, exit_every=16)
    with Qemu(guest, ring_entries=4096, name=f"kvmtrace-rate{vcpus}") as qemu:
        qemu.wait_guest()
        run = record_calc_dirty_rate(qemu, tmp_path / "calc.kvt", CALC_S)
    rate = run.qemu
    assert rate.calc_time_s == CALC_S and sorted(rate.vcpu_dirty_rate) == list(range(vcpus))
    assert rate.dirty_rate == sum(rate.vcpu_dirty_rate.values())  # QEMU's own VM total
    ev = open_recording(run.path).read_all()
    pushes = ev[ev["kind"] == Kind.PUSH]
    assert set(pushes["pid"].tolist()) == {run.pid}
    assert rate.asked_ns < int(pushes["ts"].min()) and int(pushes["ts"].max()) < rate.measured_ns
    p = subprocess.run(kvmtrace_cmd("replay", "--json", str(run.path)), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr
    report = json.loads(p.stdout)
    assert report["lost"] == 0
    rows = compare_with_qemu(ev, report, rate)
    detail = [(a.vcpu, a.entries, a.kvmtrace_rounded, a.qemu_mbps, a.span_mbps) for a in rows]
    assert all(a.qemu_mbps >= MIN_MBPS for a in rows), detail
    assert all(a.rel_diff <= 0.01 for a in rows), detail
    # exact: the entries QEMU harvested (the resets' reset_index advance) give its figure
    calc_ms = CALC_S * 1000
    assert [qemu_mbps(a.harvested, calc_ms) for a in rows] == [a.qemu_mbps for a in rows]
    # per VM: QEMU's total is the sum of its truncated per-vCPU figures
    vm_rounded = sum(a.kvmtrace_rounded for a in rows)
    assert abs(vm_rounded - rate.dirty_rate) <= 0.01 * rate.dirty_rate, (vm_rounded, rate)
    (vm,) = report["vms"]
    assert vm["pushes"] == len(pushes) and vm["rings"] == vcpus


@pytest.mark.kernel
def test_top_says_dirty_logging_off(tmp_path, qemu_ok):
    """QEMU with a dirty ring and no dirty logging pushes nothing: ``top`` names the VM,
    its ring size (QEMU's dirty-ring-size) and why nothing shows."""
    guest = MultibootGuest(vcpus=2, pages=1024)
    argv = Qemu(guest, ring_entries=2048, name="idle01").argv(
        str(guest.write(tmp_path / "guest.elf")), str(tmp_path / "qmp.sock"))
    p = subprocess.run(kvmtrace_cmd("top", "-b", "-n", "3", "-d", "0.5", "--", *argv),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    last = p.stdout.split("kvmtrace top")[-1].splitlines()
    (row,) = [ln for ln in last if "ring 2048 entries, 0 pushes" in ln]
    assert row.split()[1] == "idle01"
    assert "  dirty logging off: starts with a migration, calc-dirty-rate or a dirty limit" in last
