"""Live ``top`` without races (issue F item 7), against the built-in VMM on the real kernel.

One child process runs cycles of several VMs at once (threads), each VM with several vCPUs:
VM fds are reused from one cycle to the next, and new rings often land where freed ones
were, so push slots change owner (and fold their counts into a row) while a snapshot
thread keeps reading. With the slot array shrunk (KT_PUSH_SLOT_BITS) most rings collide and
take the hash-map path. Every snapshot must be consistent (a ring's cumulative pushes never
go back) and the last one exact: per (pid, VM fd, ring) the pushes the VMM wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from kvmtrace.bpf.loader import Probes
from kvmtrace.testing.held import attach, release
from kvmtrace.testing.snapshot_watch import (
    plan,
    pushes_by_ring,
    pushes_written,
    snapshot_mismatch,
    start_cycles,
    watch_cycles,
)

pytestmark = pytest.mark.kernel


def check(truths: list[dict], snaps: list) -> None:
    want = pushes_written(truths)
    for t in truths:
        for r in t["rings"]:
            assert r["harvested"] == r["pages_written"] and r["lost_suspected"] == 0
    final = snaps[-1]
    assert pushes_by_ring(final) == want
    assert sum(c.entries_reset for k, c in final.rings.items() if k.ring >= 0) == sum(want.values())
    assert all(c.lost == 0 and c.stuck is None for c in final.rings.values())
    # no push vanishes for an interval, none is counted twice
    assert snapshot_mismatch(truths, snaps) is None
    assert final.lost_events == 0


@pytest.mark.parametrize("run", range(2))
def test_many_rings_through_four_slots_stay_exact(kvm, bpf_root, run):
    """4 slots for 3 cycles of 4 VMs x 5 vCPUs (60 rings, 20 at a time): collisions, owner
    changes and folds under a snapshot loop."""
    truths, snaps, probes = watch_cycles(plan(4, 5, 3), push_slot_bits=2)
    with probes:
        assert probes.fast_push
        check(truths, snaps)
        assert len({t["vm_fd"] for t in truths}) < len(truths)  # some fd reused by a new VM
        assert len(snaps) > 2  # snapshots were taken while the VMs ran


def test_more_rings_than_slots_stay_exact(kvm, bpf_root):
    """More rings than the default 1024 slots' worth with a 64-slot array: 2 cycles of
    8 VMs x 12 vCPUs (192 rings)."""
    truths, snaps, probes = watch_cycles(plan(8, 12, 2, pages=200), push_slot_bits=6)
    with probes:
        check(truths, snaps)


def test_1200_rings_with_the_default_slots_stay_exact(kvm, bpf_root):
    """30 VMs x 40 vCPUs (6 cycles of 5 VMs at once: 1200 rings, more than the 1024 slots;
    rings of earlier cycles keep theirs, later rings collide and take the hash-map path)."""
    truths, snaps, probes = watch_cycles(plan(5, 40, 6, pages=100))
    with probes:
        check(truths, snaps)
        assert sum(len(t["rings"]) for t in truths) == 1200


def test_free_slot_is_a_compare_and_delete(kvm, bpf_root):
    """Probes.free_slot() frees a slot only while its seq is the one read with it."""
    truths, snaps, probes = watch_cycles(plan(1, 2, 1), push_slot_bits=4)
    with probes:
        check(truths, snaps)
        index, slots = probes.read_map("push_slots")
        owned = [(int(i), int(s["seq"])) for i, s in zip(index, slots, strict=True) if s["ptr"]]
        assert owned
        i, seq = owned[0]
        assert not probes.free_slot(i, seq + 2)  # an owner change since: left alone
        assert not probes.free_slot(i, seq + 1)  # odd: a change in progress
        _, after = probes.read_map("push_slots")
        assert after[i]["ptr"] and after[i]["seq"] == seq
        assert probes.free_slot(i, seq)
        _, after = probes.read_map("push_slots")
        assert (int(after[i]["ptr"]), int(after[i]["pushes"]), int(after[i]["seq"])) == (
            0, 0, seq + 2)
        pid = truths[0]["pid"]
        probes.forget(pid)
        assert probes.map_sizes()["push_slots"] == 0
        assert not [k for k in probes.snapshot().rings if k.pid == pid]


def test_exited_vmm_leaves_no_map_entries(kvm, bpf_root):
    """LiveSource with the process watcher: once the VMM exits, its rows, VMs, vCPU fds,
    push slots and per-thread entries are gone (one snapshot after the exit is seen)."""
    from conftest import require

    from kvmtrace.bpf.snapshot_source import LiveSource

    try:
        import pyroute2  # noqa: F401
    except ImportError:
        require(False, "pyroute2 not installed (the process watcher needs it)")
    child = start_cycles(plan(2, 3, 1))
    source = attach(child, lambda: LiveSource(probes=Probes(pid=child.pid), watch=True))
    with source:
        truths = release(child)
        held = source.probes.map_sizes()
        assert (held["rings"], held["vms"], held["vcpus"]) == (6, 2, 6)
        assert held["tids"] >= 6  # the vCPU threads and the thread creating the VMs
        import time

        time.sleep(0.2)  # the exit notifications arrive
        last = source.snapshot()  # sees the exit, keeps the final counts
        check(truths, [last])
        source.snapshot()  # drops them
        assert source.probes.map_sizes() == {"rings": 0, "vms": 0, "vcpus": 0, "tids": 0,
                                             "push_slots": 0}


STEPPED_VMS = """
import json, sys
from kvmtrace.vmm.workload import WorkloadConfig, run_workload
for cfg in json.loads(sys.argv[1]):
    if not sys.stdin.buffer.read(1):
        break
    print(json.dumps(run_workload(WorkloadConfig(**cfg)).to_dict()), flush=True)
sys.stdin.buffer.read(1)
"""


def test_closed_vm_of_a_live_process_is_dropped(kvm, bpf_root):
    """A VMM that closes a VM and later makes another under the same fd: the closed VM's
    entries go away while the process lives (two snapshots after it closed), and the new
    VM's rows count exactly its own pushes."""
    from conftest import require

    from kvmtrace.bpf.snapshot_source import LiveSource

    try:
        import pyroute2  # noqa: F401
    except ImportError:
        require(False, "pyroute2 not installed (the process watcher needs it)")
    cfg = {"vcpus": 2, "ring_bytes": 4096, "pages": 300, "exit_every": 1}
    child = subprocess.Popen([sys.executable, "-c", STEPPED_VMS, json.dumps([cfg, cfg])],
                             cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    try:
        with LiveSource(probes=Probes(pid=child.pid), watch=True) as source:
            child.stdin.write(b"1")
            child.stdin.flush()
            first = json.loads(child.stdout.readline())
            check([first], [source.snapshot()])  # closed, counts still shown
            check([first], [source.snapshot()])  # gone twice with the same counts: dropped
            sizes = source.probes.map_sizes()
            del sizes["tids"]  # the process and its threads live on
            assert sizes == {"rings": 0, "vms": 0, "vcpus": 0, "push_slots": 0}
            child.stdin.write(b"2")
            child.stdin.flush()
            second = json.loads(child.stdout.readline())
            assert second["vm_fd"] == first["vm_fd"]  # the fd was reused
            check([second], [source.snapshot()])
    finally:
        child.stdin.close()
        child.wait(timeout=30)
