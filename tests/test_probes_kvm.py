"""The BPF probes against a real dirty-ring guest: exact counts against its ground truth.

The workload runs as a child that blocks on stdin before exec'ing ``kvmtrace workload``, so
its pid is known before it creates the VM: the probes are loaded with that pid as filter
(other engineers' guests run concurrently on this machine) and then the child is released.
No timing is asserted, only counts, identities and sizes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, kvmtrace_cmd, require, require_kvm_bpf

from kvmtrace.core.counters import RingKey, VmKey
from kvmtrace.core.events import Kind
from kvmtrace.errors import MissingFeature, UsageError
from kvmtrace.testing.held import attach, release

VCPUS, RING_BYTES, PAGES = 2, 4096, 1000
WORKLOAD = ["workload", "--vcpus", str(VCPUS), "--ring-bytes", str(RING_BYTES),
            "--pages", str(PAGES), "--exit-every", "1", "--json"]
GATE = ("import os, sys; sys.stdin.buffer.read(1); "
        "os.execv(sys.executable, [sys.executable, '-m', 'kvmtrace', *sys.argv[1:]])")


def gated(args: list[str]) -> subprocess.Popen[bytes]:
    """A child that becomes ``python -m kvmtrace ARGS`` (same pid) once fed a byte."""
    return subprocess.Popen([sys.executable, "-c", GATE, *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def run_traced(hook: str):
    """Load the probes (aggregation + events) on a gated workload; (probes, truth, events)."""
    from kvmtrace.bpf.loader import Probes

    child = gated(WORKLOAD)
    probes = attach(child, lambda: Probes(pid=child.pid, hook=hook, with_events=True,
                                          ringbuf_pages=256))
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(b"go")
    child.stdin.close()
    batches = []
    while child.poll() is None:
        batches.append(probes.poll_events(50))
    out = child.stdout.read()
    batches.append(probes.poll_events(0))
    assert child.returncode == 0, out
    return probes, json.loads(out), np.concatenate(batches)


@pytest.fixture(scope="module", params=["raw_tp", "tp"])
def traced(request: pytest.FixtureRequest):
    require_kvm_bpf()
    probes, truth, events = run_traced(request.param)
    snap = probes.snapshot()
    rings = probes.read_map("rings")
    probes.close()
    return request.param, probes, truth, events, snap, rings


def test_hooks_chosen(traced) -> None:
    hook, probes, *_ = traced
    kvm_events = ("kvm_dirty_ring_push", "kvm_dirty_ring_reset", "kvm_dirty_ring_exit",
                  "kvm_userspace_exit")
    assert {probes.hooks[e] for e in kvm_events} == {hook}
    assert probes.hooks["sys_enter_ioctl"] == probes.hooks["sys_exit_ioctl"] == "syscall_tp"


def test_aggregates_equal_ground_truth(traced) -> None:
    _hook, _p, truth, _ev, snap, _rings = traced
    pid, vm = truth["pid"], truth["vm_fd"]
    assert truth["ring_entries"] == RING_BYTES // 16
    real = snap.rings  # ring rows only: the VM-wide reset ioctl is in snap.vm_counters
    assert sorted(real) == [RingKey(pid, vm, r["index"]) for r in truth["rings"]]
    for r in truth["rings"]:
        c = real[RingKey(pid, vm, r["index"])]
        assert c.pushes == r["harvested"] == PAGES
        assert c.soft_full_exits == r["soft_full_exits"]
        assert c.entries_reset == r["entries_reset"] == r["harvested"]
        assert c.resets == truth["resets"]
        assert c.size == truth["ring_entries"]
        assert c.dirty_index == c.reset_index == PAGES  # every entry harvested and reset
        assert c.max_used == truth["soft_limit"]
        assert c.lost == 0
        assert sum(c.stall_hist) == r["soft_full_exits"]
        assert (c.stall_ns > 0) == (r["soft_full_exits"] > 0)
    vmc = snap.vm_counters[VmKey(pid, vm)]  # KVM_RESET_DIRTY_RINGS (a vm ioctl), per VM
    assert vmc.reset_ioctls == sum(vmc.reset_lat_hist) == truth["resets"]
    assert snap.vms[(pid, vm)].ring_bytes == truth["ring_bytes"]
    assert snap.lost_events == 0


def test_exit_used_min_is_soft_limit_and_implies_size(traced) -> None:
    from kvmtrace.model.sizes import live_ring_size

    _hook, _p, truth, _ev, _snap, (keys, vals) = traced
    assert len(keys) == VCPUS
    assert vals["exit_used_min"].tolist() == [truth["soft_limit"]] * VCPUS
    assert live_ring_size(0, 0, truth["soft_limit"]) == truth["ring_entries"]


def test_event_stream_has_the_same_counts(traced) -> None:
    _hook, _p, truth, ev, snap, _rings = traced
    pid, vm = truth["pid"], truth["vm_fd"]
    assert set(ev["pid"].tolist()) == {pid}
    assert set(ev["vm"].tolist()) == {vm}
    for r in truth["rings"]:
        mine = ev[ev["ring"] == r["index"]]
        kinds = mine["kind"]
        assert int((kinds == Kind.PUSH).sum()) == r["harvested"]
        assert int((kinds == Kind.EXIT).sum()) == r["soft_full_exits"]
        assert int((kinds == Kind.STALL).sum()) == r["soft_full_exits"]
        assert int((kinds == Kind.RESET).sum()) == truth["resets"]
        pushes = mine[kinds == Kind.PUSH]
        assert pushes["dirty_index"].tolist() == list(range(1, PAGES + 1))
        assert set(pushes["tid"].tolist()) == {r["tid"]}
        stall_ns = int(mine["value"][kinds == Kind.STALL].sum())
        assert stall_ns == snap.rings[RingKey(pid, vm, r["index"])].stall_ns
    lat = ev[ev["kind"] == Kind.RESET_LAT]
    assert len(lat) == truth["resets"] and set(lat["ring"].tolist()) == {-1}
    size = ev[ev["kind"] == Kind.RING_SIZE]
    assert [(int(e["value"]), int(e["slot"])) for e in size] == [(truth["ring_bytes"],
                                                                   truth["cap"])]


@pytest.mark.parametrize("identity", ["auto", "thread"])
def test_preexisting_vm_is_resolved_by_live_source(kvm, bpf_root, identity) -> None:
    """A VM created before the probes. ``auto`` (struct kvm * identity): every event names
    the VM fd. ``thread`` (what a kernel without BTF gets): the kernel side says vm = -1
    for its pushes (resets know the VM fd), LiveSource resolves and merges them under the
    process's only VM fd. The ring size (KVM_ENABLE_CAP was missed) is inferred from the
    soft-full exits."""
    from kvmtrace.bpf.loader import Probes
    from kvmtrace.bpf.snapshot_source import LiveSource
    from kvmtrace.bpf.vmident import vm_fds

    child = subprocess.Popen(kvmtrace_cmd("workload", "--vcpus", "1", "--ring-bytes", "4096",
                                          "--pages", "1000", "--passes", "100", "--json"),
                             cwd=ROOT, stdout=subprocess.PIPE)
    try:
        while child.poll() is None and not _has_fd(child.pid, "anon_inode:kvm-vcpu:0"):
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGSTOP)  # vCPU exists: the probes see no CREATE_VCPU
        assert child.poll() is None, "workload ended before it could be stopped"
        (vm,) = vm_fds(child.pid)
        source = LiveSource(probes=Probes(pid=child.pid, hook="tp", with_events=True,
                                          vm_identity=identity))
        fast = LiveSource(probes=Probes(pid=child.pid, hook="raw_tp",  # what top loads
                                        vm_identity=identity))
        os.kill(child.pid, signal.SIGCONT)
        batches, raw_vms = [], set()
        while child.poll() is None:
            batches.append(source.probes.poll_events(20))
            source.snapshot()  # resolves while the process is alive
            fast.snapshot()
            keys, _vals = source.probes.read_map("rings")
            raw_vms |= {int(k["vm"]) for k in keys}
        truth = json.loads(child.stdout.read())
        batches.append(source.probes.poll_events(0))
        snap, snap_fast = source.snapshot(), fast.snapshot()
        assert fast.probes.fast_push
        source.close()
        fast.close()
    finally:
        child.kill()
        child.wait()
    ev = np.concatenate(batches)
    if identity == "thread":
        assert raw_vms == {-1, vm} and set(ev["vm"][ev["kind"] == Kind.PUSH].tolist()) == {-1}
    else:
        assert raw_vms == {vm} and set(ev["vm"].tolist()) == {vm}
    assert sorted(snap.rings) == [RingKey(child.pid, vm, 0)]
    assert list(snap.vm_counters) == [VmKey(child.pid, vm)]
    assert snap.vm_counters[VmKey(child.pid, vm)].reset_ioctls == int(
        (ev["kind"] == Kind.RESET_LAT).sum())
    ring = snap.rings[RingKey(child.pid, vm, 0)]
    (truth_ring,) = truth["rings"]
    pushes = ev[ev["kind"] == Kind.PUSH]
    first = ev[np.isin(ev["kind"], [Kind.PUSH, Kind.RESET])][0]
    assert ring.dirty_index == ring.reset_index == truth_ring["harvested"]
    assert ring.pushes == len(pushes) == truth_ring["harvested"] - int(pushes[0]["dirty_index"]) + 1
    assert ring.soft_full_exits == int((ev["kind"] == Kind.EXIT).sum())
    assert ring.resets == int((ev["kind"] == Kind.RESET).sum())
    assert ring.entries_reset == ring.reset_index - int(first["reset_index"])
    assert ring.size == truth["ring_entries"]
    assert snap.vms[(child.pid, vm)].comm.startswith("python")
    # the push fast path (raw tracepoint, aggregation only) comes to the same counters
    assert sorted(snap_fast.rings) == sorted(snap.rings)
    fields = ("pushes", "resets", "entries_reset", "soft_full_exits", "dirty_index",
              "reset_index", "max_used", "lost", "size")
    got = snap_fast.rings[RingKey(child.pid, vm, 0)]
    assert [getattr(got, f) for f in fields] == [getattr(ring, f) for f in fields]


TWO_VMS = """
import json, sys, threading
from kvmtrace.vmm.workload import WorkloadConfig, run_workload
sys.stdin.buffer.read(1)
out = [None, None]
def run(i):
    cfg = WorkloadConfig(vcpus=1 + i, ring_bytes=4096 << i, pages=600, exit_every=1)
    out[i] = run_workload(cfg).to_dict()
threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


def test_two_vms_in_one_process_are_kept_apart(kvm, bpf_root) -> None:
    """Two VMs alive at once in one VMM (different fds, ring sizes and vCPU counts)."""
    from kvmtrace.bpf.loader import Probes

    child = subprocess.Popen([sys.executable, "-c", TWO_VMS], cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    probes = attach(child, lambda: Probes(pid=child.pid, hook="auto"))
    truths = release(child)
    snap = probes.snapshot()
    probes.close()
    assert len({t["vm_fd"] for t in truths}) == 2
    want, got = {}, {}
    for t in truths:
        for r in t["rings"]:
            want[RingKey(t["pid"], t["vm_fd"], r["index"])] = (
                r["harvested"], r["soft_full_exits"], t["resets"], t["ring_entries"])
    for key, c in snap.rings.items():
        if key.ring >= 0:
            got[key] = (c.pushes, c.soft_full_exits, c.resets, c.size)
    assert got == want
    assert {k: v.ring_bytes for k, v in snap.vms.items()} == {
        (t["pid"], t["vm_fd"]): t["ring_bytes"] for t in truths}


def _has_fd(pid: int, link: str) -> bool:
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == link:
                return True
        except OSError:
            pass
    return False


def test_bad_options_are_usage_errors() -> None:
    from kvmtrace.bpf.loader import Probes, select_hooks

    with pytest.raises(UsageError):
        Probes(ringbuf_pages=1000)
    with pytest.raises(UsageError, match="unknown probes mode 'full'"):
        Probes("full")
    with pytest.raises(UsageError, match="with_events is for mode top, not record"):
        Probes("record", with_events=True)
    with pytest.raises(UsageError):
        Probes(pid=-1)
    with pytest.raises(UsageError):
        select_hooks("kprobe")
    with pytest.raises(UsageError):
        select_hooks("auto", "pid")


def test_vm_ptr_defines_need_btf_and_both_symbols(tmp_path) -> None:
    from kvmtrace.bpf.loader import vm_ptr_defines
    from kvmtrace.host.btf import VMLINUX, load_vmlinux
    from kvmtrace.host.kallsyms import addresses

    syms = tmp_path / "kallsyms"
    syms.write_text("ffffffff812825e0 t kvm_vm_ioctl\n0000000000000000 t kvm_vcpu_ioctl\n"
                    "ffffffffc0a00000 t kvm_vcpu_ioctl\t[kvm]\nffffffff81000000 T _text\n")
    # a hidden (0) address is skipped, a module's symbol counts
    assert addresses({"kvm_vm_ioctl", "kvm_vcpu_ioctl", "nope"}, syms) == {
        "kvm_vm_ioctl": 0xFFFFFFFF812825E0, "kvm_vcpu_ioctl": 0xFFFFFFFFC0A00000}
    assert addresses({"x"}, tmp_path / "missing") == {}
    assert vm_ptr_defines(None) is None
    require(VMLINUX.is_file(), f"no kernel BTF at {VMLINUX}")
    btf = load_vmlinux()
    assert vm_ptr_defines(btf, {"kvm_vm_ioctl": 0x10}) is None  # kvm_vcpu_ioctl missing
    got = vm_ptr_defines(btf, {"kvm_vm_ioctl": 0x10, "kvm_vcpu_ioctl": 0x20})
    assert got is not None and "-DKT_VM_PTR=1" in got
    assert {"-DKT_VM_IOCTL=0x10ULL", "-DKT_VCPU_IOCTL=0x20ULL"} <= set(got)
    assert f"-DKT_OFF_VCPU_KVM={btf.offsetof('kvm_vcpu', 'kvm')}" in got


def test_preflight_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from kvmtrace.bpf import loader
    from kvmtrace.host import headers, tracefs

    def fails(fix_part: str) -> str:
        with pytest.raises(MissingFeature) as err:
            loader.preflight()
        assert fix_part in str(err.value) and "\n" not in str(err.value)
        return str(err.value)

    with monkeypatch.context() as m:
        m.setattr(os, "geteuid", lambda: 1000)
        fails("root")
    with monkeypatch.context() as m:
        m.setattr(os, "geteuid", lambda: 0)
        m.setattr(tracefs, "CANDIDATES", (tmp_path,))
        fails("mount -t tracefs nodev /sys/kernel/tracing")
    with monkeypatch.context() as m:
        m.setattr(os, "geteuid", lambda: 0)
        root = tmp_path / "tracing"
        (root / "events" / "kvm" / "kvm_dirty_ring_push").mkdir(parents=True)
        (root / "events" / "kvm" / "kvm_dirty_ring_push" / "format").write_text("x")
        m.setattr(tracefs, "CANDIDATES", (root,))
        assert "kvm:kvm_dirty_ring_reset" in fails("Linux >= 5.11")
    if os.geteuid() == 0 and tracefs.find_tracefs() is not None:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "bcc", None)
            fails("python3-bpfcc")
        with monkeypatch.context() as m:
            m.setattr(headers, "find_headers", lambda release=None: None)
            m.delenv("BCC_KERNEL_SOURCE", raising=False)
            fails("tools/setup.sh")


def test_auto_prefers_raw_tp_and_falls_back_without_btf(
    bpf_root, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvmtrace.bpf import loader

    def no_btf():
        raise MissingFeature("no kernel BTF", "pass hook='tp'")

    require(loader.detect().raw_tracepoint, "kernel has no raw tracepoints")
    hooks, cflags = loader.select_hooks("auto")  # this kernel: raw tracepoints + BTF
    assert [hooks[e] for e in loader._RAW] == ["raw_tp"] * 4 and "-DKT_RAW_PUSH=1" in cflags
    monkeypatch.setattr(loader, "load_vmlinux", no_btf)
    with pytest.raises(MissingFeature):
        loader.select_hooks("raw_tp")
    hooks, cflags = loader.select_hooks("auto")
    assert hooks["kvm_dirty_ring_push"] == "tp" and "-DKT_RAW_PUSH=0" in cflags


def test_watcher_drops_exited_vmm_one_snapshot_later(kvm, bpf_root) -> None:
    from kvmtrace.bpf.loader import Probes
    from kvmtrace.bpf.snapshot_source import LiveSource

    child = gated(WORKLOAD)
    source = attach(child, lambda: LiveSource(probes=Probes(pid=child.pid, hook="auto"),
                                              watch=True))
    # the connector's exit message is queued before the parent is notified of the exit
    truth = release(child)
    last = source.snapshot()  # sees the exit, still reports the final counts
    assert source.probes.fast_push
    held_slots = len(source.probes.push_slots())
    after = source.snapshot()  # the exited VMM's entries are gone, its slots free
    freed = source.probes.push_slots()
    source.close()
    assert held_slots == len(truth["rings"]) and len(freed) == 0
    pid, vm = truth["pid"], truth["vm_fd"]
    assert [last.rings[RingKey(pid, vm, r["index"])].pushes for r in truth["rings"]] == [
        r["harvested"] for r in truth["rings"]]
    assert last.vms[(pid, vm)].ring_bytes == truth["ring_bytes"]
    assert after.rings == {} and after.vms == {}


def test_proc_watcher_reports_exec_and_exit(bpf_root) -> None:
    from kvmtrace.bpf.vmident import ProcEvent, ProcWatcher

    watcher = ProcWatcher()
    try:
        child = subprocess.Popen(["/bin/true"])
        child.wait()
        seen: list[ProcEvent] = []
        while not any(e.kind == "exit" and e.pid == child.pid for e in seen):
            got = watcher.poll(5.0)
            assert got, "no process event within 5 s"
            seen += got
    finally:
        watcher.close()
    assert [e.kind for e in seen if e.pid == child.pid] == ["exec", "exit"]


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["/usr/bin/qemu-system-x86_64", "-name", "guest=web1,debug-threads=on"], "web1"),
        (["qemu-kvm", "-m", "1G", "-name", "db2"], "db2"),
        (["qemu-kvm", "-name", "a,,b,process=qemu:x"], "a,b"),
        (["qemu-kvm", "-name=solo"], "solo"),
        (["/usr/bin/firecracker", "--api-sock", "/tmp/fc.sock", "--id", "fc-42"], "fc-42"),
        (["cloud-hypervisor", "--api-socket", "path=/run/ch/vm7-socket"], "vm7"),
        (["cloud-hypervisor", "--api-socket", "/tmp/box.sock"], "box"),
        (["python", "-m", "kvmtrace", "workload"], None),
        ([], None),
    ],
)
def test_vm_names_from_command_lines(argv: list[str], name: str | None) -> None:
    from kvmtrace.bpf.vmident import vm_name

    assert vm_name(argv) == name


def test_vm_fds_of_a_process_without_vms() -> None:
    from kvmtrace.bpf.vmident import resolve_vm, vm_fds

    assert vm_fds(os.getpid()) == [] and resolve_vm(os.getpid()) == -1
    assert vm_fds(2**22 + 1) == []  # beyond pid_max: no such process


def test_live_size_inferred_only_when_unambiguous() -> None:
    from kvmtrace.model.sizes import live_ring_size

    def infer(exit_used_min: int) -> int | None:  # no size from the kernel nor the cap
        return live_ring_size(0, 0, exit_used_min)

    assert infer(192) == 256  # 256 - 64
    assert infer(448) is None  # 512 - 64 or 1024 - 576 (Intel PML): ambiguous
    assert infer(3520) == 4096  # 4096 - 576
    assert infer(4032) == 4096  # 4096 - 64
    assert infer(200) is None  # an exit past the soft limit: unknown, not a guess
    assert infer(0) is None
    assert live_ring_size(512, 4096, 192) == 512  # the ring's own size first
    assert live_ring_size(0, 16384, 192) == 1024  # then the VM's KVM_ENABLE_CAP bytes


def test_merge_rows_of_one_ring_under_two_keys() -> None:
    from kvmtrace.bpf.layout import RING_VAL_DTYPE
    from kvmtrace.bpf.loader import merge_rows

    def row(**kw):
        r = {n: 0 for n in RING_VAL_DTYPE.names}
        r["stall_hist"] = [0] * RING_VAL_DTYPE["stall_hist"].shape[0]
        r.update(kw)
        return r

    # pushes of a VM older than the probes (vm -1), then a reset under its VM fd that
    # harvested up to the last push: same dirty_index, the reset's reset_index is later
    pushes = row(pushes=500, dirty_index=700, reset_index=400, reset_base=100, max_used=192,
                 exit_used_min=192, stalls=2, stall_ns=30, soft_full_exits=2,
                 stall_hist=[1, 1] + [0] * 38)
    resets = row(resets=3, entries_reset=300, dirty_index=700, reset_index=600,
                 reset_base=600, size=256, stall_hist=[0, 2] + [0] * 38)
    for m in (merge_rows(pushes, resets), merge_rows(resets, pushes)):
        assert (m["pushes"], m["resets"], m["entries_reset"], m["soft_full_exits"]) == (
            500, 3, 300, 2)
        assert (m["dirty_index"], m["reset_index"], m["reset_base"]) == (700, 600, 600)
        assert (m["max_used"], m["size"], m["exit_used_min"]) == (192, 256, 192)
        assert m["stall_hist"][:3] == [1, 3, 0] and m["stall_ns"] == 30
    # a push after that reset: the push row is the later one, in either order
    later = dict(pushes, pushes=501, dirty_index=701, reset_index=600)
    for m in (merge_rows(later, resets), merge_rows(resets, later)):
        assert (m["dirty_index"], m["reset_index"], m["pushes"]) == (701, 600, 501)
    # indices are free-running u32: 0x10 comes after 0xFFFFFFF0
    old = dict(resets, dirty_index=0xFFFF_FFF0, reset_index=0xFFFF_FF00)
    new = dict(pushes, dirty_index=0x10, reset_index=0xFFFF_FFF0)
    for m in (merge_rows(old, new), merge_rows(new, old)):
        assert (m["dirty_index"], m["reset_index"]) == (0x10, 0xFFFF_FFF0)
    # a row of soft-full exits only (light mode: no push probe) has no indices to offer
    exits = row(soft_full_exits=4, exit_used_min=192)
    for m in (merge_rows(exits, resets), merge_rows(resets, exits)):
        assert (m["dirty_index"], m["reset_index"], m["soft_full_exits"]) == (700, 600, 4)
