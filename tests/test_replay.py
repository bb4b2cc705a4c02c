"""``kvmtrace replay`` end to end on the shared samples and on synthetic recordings written
with RecordingWriter: exit status, the JSON schema and its types, 80-column text,
``--dump-harvest`` against the model's own harvest, ``--simulate-ring-entries``. No
kernel needed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import kvmtrace_cmd

from kvmtrace.core.sources import SourceMeta
from kvmtrace.source.recording import RecordingWriter
from kvmtrace.testing.synth import SynthVm
from kvmtrace.vmm.truth import RingTruth as WlRing
from kvmtrace.vmm.truth import WorkloadResult

PID, VM = 4242, 9


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd("replay", *args), capture_output=True, text=True,
                          timeout=120)


def strict_json(text: str) -> dict[str, Any]:
    def no_constant(name: str) -> None:
        raise AssertionError(f"{name} in JSON output")

    lines = text.splitlines()
    assert len(lines) == 1  # one object, one line
    return json.loads(lines[0], parse_constant=no_constant)


def record(path: Path, vm: SynthVm, lost: int = 0) -> Path:
    with RecordingWriter(path, SourceMeta(kind="recording")) as w:
        w.write(vm.events())
        w.add_lost(lost)
    return path


def clean_vm(entries: int = 1024, cycles: int = 3) -> tuple[SynthVm, list[list]]:
    """One vCPU, exits at the soft limit each cycle; returns the VM and, per ring, what
    every reset collected, in order (the ground truth of --dump-harvest)."""
    vm = SynthVm(entries, vcpus=2, pid=PID, vm=VM)
    vm.ring_size_event()
    got: list[list] = [[], []]
    limit = entries - 64
    for c in range(cycles):
        for k in range(limit):
            vm.push(0, 1, (c * limit + k) * 7 % 5000)
            if k % 3 == 0:
                vm.push(1, 2, k)
        assert vm.enter(0)
        vm.harvest()
        for i, part in enumerate(vm.reset()):
            got[i] += [list(e) for e in part]
    return vm, got


def test_samples_exit_0_text_fits_80_columns(samples: Path):
    for name in ("ftrace-1vcpu-8192B-800pages.txt", "perf-script-3vcpu-4096B-400pages.txt"):
        p = cli(str(samples / name), "--simulate-ring-entries", "256")
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80
        assert "no anomalies" in p.stdout and "(inferred)" in p.stdout


def test_json_schema_and_types_on_a_sample(samples: Path):
    p = cli(str(samples / "perf-script-3vcpu-4096B-400pages.txt"), "--json",
            "--simulate-ring-entries", "1024", "--top", "3")
    assert p.returncode == 0, p.stderr
    d = strict_json(p.stdout)
    assert d["schema"] == 1 and d["source"] == "perf-script"
    assert (d["events"], d["lost"], d["clean"], d["anomalies"]) == (1217, 0, True, [])
    ints = ("index", "pushes", "resets", "entries_reset", "soft_full_exits", "max_used",
            "dirty_index", "reset_index", "overwritten", "harvested")
    for r in d["rings"]:
        assert all(type(r[k]) is int for k in ints)
        assert (r["pushes"], r["size"], r["size_source"], r["soft_limit"]) == (
            400, 256, "inferred", 192)
        assert isinstance(r["digest"], str) and len(r["digest"]) == 32
        assert set(r["stall"]) == {"count", "total_ns", "p50_ns", "p99_ns", "max_ns"}
    assert len({r["digest"] for r in d["rings"]}) == 3
    ws = d["workingset"]["rings"]
    assert [w["pushes"] for w in ws] == [400, 400, 400]
    assert [w["distinct_max"] for w in ws] == [400, 400, 400]  # 400 distinct pages each
    (hot,) = d["hottest"]
    assert len(hot["pages"]) == 3 and all(p["pushes"] == 1 for p in hot["pages"])
    sim = d["simulation"]
    assert (sim["entries"], sim["soft_limit"], sim["exits"], sim["trace_exits"]) == (
        1024, 960, 0, 2)


def test_clean_recording_exit_0_and_dump_harvest_matches_model(tmp_path: Path):
    vm, truth = clean_vm()
    path = record(tmp_path / "clean.kvt", vm)
    out = tmp_path / "harvest.json"
    p = cli(str(path), "--json", "--dump-harvest", str(out))
    assert p.returncode == 0, p.stderr
    d = strict_json(p.stdout)
    assert d["source"] == "recording" and d["anomalies"] == []
    assert [(r["pid"], r["vm"], r["index"]) for r in d["rings"]] == [(PID, VM, 0), (PID, VM, 1)]
    assert [r["pushes"] for r in d["rings"]] == [3 * 960, 3 * 320]
    assert [r["size_source"] for r in d["rings"]] == ["trace", "trace"]
    dump = json.loads(out.read_text())
    # the shape of `kvmtrace workload --dump-harvest`
    wl = WorkloadResult(PID, VM, 223, 16384, 1024, 960, 2, 0, 1, None, "seq", 0, 1, "on-full",
                        0.0, 0.0, [WlRing(0), WlRing(1)], harvest_log=truth).harvest_dump()
    assert set(dump) == set(wl) and set(dump["rings"][0]) >= set(wl["rings"][0])
    assert (dump["pid"], dump["vm_fd"], dump["ring_entries"]) == (PID, VM, 1024)
    assert [r["harvested"] for r in dump["rings"]] == [r["harvested"] for r in wl["rings"]]


def test_overflow_recording_exit_1_names_lost_pages(tmp_path: Path):
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, [(0, 0x1000 + k) for k in range(300)], exit_every=0)
    path = record(tmp_path / "overflow.kvt", vm)
    p = cli(str(path), "--json")
    assert p.returncode == 1, p.stderr
    d = strict_json(p.stdout)
    kinds = [a["kind"] for a in d["anomalies"]]
    assert kinds == ["no_exit", "overflow"]
    ov = d["anomalies"][1]
    assert ov["ring"] == {"pid": PID, "vm": VM, "vm_gen": 0, "index": 0}
    assert (ov["dirty_index"], ov["reset_index"], ov["count"]) == (257, 0, 44)
    assert ov["entries"] == [[0, 0x1000 + k] for k in range(44)]
    assert isinstance(ov["time"], int) and "overwritten" in ov["detail"]
    assert d["rings"][0]["overwritten"] == 44
    t = cli(str(path))
    assert t.returncode == 1
    assert "anomalies (2):" in t.stdout and "overflow ring 0" in t.stdout
    assert max(len(line) for line in t.stdout.splitlines()) <= 80


def test_lost_events_exit_1(tmp_path: Path):
    vm, _ = clean_vm(cycles=1)
    p = cli(str(record(tmp_path / "lost.kvt", vm, lost=5)), "--json")
    assert p.returncode == 1
    d = strict_json(p.stdout)
    assert (d["lost"], d["anomalies"], d["clean"]) == (5, [], False)


def test_simulate_smaller_ring_gives_more_exits(tmp_path: Path):
    vm, _ = clean_vm(entries=1024, cycles=3)
    path = record(tmp_path / "sim.kvt", vm)
    small = strict_json(cli(str(path), "--json", "--simulate-ring-entries", "256").stdout)
    big = strict_json(cli(str(path), "--json", "--simulate-ring-entries", "4096").stdout)
    # 960 pushes per cycle into ring 0; a 256-entry ring exits every 192: 5 per cycle
    assert small["simulation"]["trace_exits"] == 3
    assert [r["exits"] for r in small["simulation"]["rings"]] == [15, 0]
    assert [r["exits"] for r in big["simulation"]["rings"]] == [0, 0]
    text = cli(str(path), "--simulate-ring-entries", "256").stdout
    assert "with a ring of 256 entries (soft limit 192): 15 soft-full exits, trace had 3" in text


@pytest.mark.parametrize("flags, needle", [
    (["--ring-entries", "300"], "--ring-entries 300"),
    (["--ring-bytes", "4096", "--ring-entries", "512"], "disagree"),
    (["--simulate-ring-entries", "100"], "--simulate-ring-entries 100"),
    (["--window", "0"], "--window"),
    (["--top", "0"], "--top"),
    (["--reserved", "100"], "--reserved 100"),
    (["--dump-harvest", "/nonexistent-dir/x.json"], "--dump-harvest"),
])
def test_bad_flags_one_line_exit_2(samples: Path, flags: list[str], needle: str):
    p = cli(str(samples / "ftrace-1vcpu-8192B-800pages.txt"), *flags)
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith("kvmtrace replay: error: ") and needle in line and "(fix: " in line


def test_vm_generation_in_json_and_text(tmp_path: Path):
    """A VM seen under a reused fd (decision 1: vm = fd | gen << 20): JSON shows the fd and
    vm_gen, text ``fd#gen``; the two VMs stay two rings."""
    from kvmtrace.core.kvm_abi import vm_id

    a, b = SynthVm(1024, pid=PID, vm=VM), SynthVm(1024, pid=PID, vm=vm_id(VM, 1))
    for vm in (a, b):
        vm.ring_size_event()
        vm.run(0, [(1, k) for k in range(100)], exit_every=1)
        vm.harvest()
        vm.reset()
    ev = np.concatenate([a.events(), b.events()])
    ev["ts"] = np.arange(len(ev)) * 1000 + 10**9
    path = tmp_path / "gen.kvt"
    with RecordingWriter(path, SourceMeta(kind="recording")) as w:
        w.write(ev)
    d = strict_json(cli(str(path), "--json").stdout)
    assert [(r["vm"], r["vm_gen"], r["pushes"]) for r in d["rings"]] == [(VM, 0, 100),
                                                                         (VM, 1, 100)]
    assert d["anomalies"] == []
    text = cli(str(path)).stdout
    assert f" {VM}#1 " in text
