"""VM names kept by ``record`` (format 1.2 meta ``vms``) and shown by every reader.

One recording of the built-in VMM run as ``kvmtrace workload --name web01``; the VMM's own
report (``--json``: its pid, VM fd and name) is the truth. replay (text, --json), compare,
export (Parquet, Perfetto), top --replay (text, --json) and the Prometheus text must all
name that VM ``web01``, as live top does. Text traces (ftrace, perf script) and recordings
of format 1.0 carry no names: null in JSON, a line saying so in text, no error.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    SAMPLES,
    RecordedRun,
    kvmtrace_cmd,
    record_workload,
    require,
    require_kvm_bpf,
)

from kvmtrace.core.counters import VmName
from kvmtrace.source.recording import FORMAT_VERSION, Recording

NAME = "web01"
COMM = os.path.basename(sys.executable)[:15]  # the kernel's task name of the VMM process
V10 = ROOT / "tests" / "data" / "recordings" / "workload-2vcpu-4096B-400pages-v1.0.kvt"
FTRACE = SAMPLES / "ftrace-1vcpu-8192B-800pages.txt"
PERF = SAMPLES / "perf-script-3vcpu-4096B-400pages.txt"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    require_kvm_bpf()
    return record_workload(tmp_path_factory.mktemp("names"), "--name", NAME, "--vcpus", "2",
                           "--ring-bytes", "4096", "--pages", "400")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(kvmtrace_cmd(*args), capture_output=True, text=True, timeout=120,
                         check=False)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def test_the_vmm_reports_its_name(run: RecordedRun) -> None:
    assert run.truth["name"] == NAME


def test_recording_meta_holds_the_name(run: RecordedRun) -> None:
    rec = Recording(run.path)
    assert rec.version == FORMAT_VERSION == (1, 2)
    pid, vm = run.truth["pid"], run.truth["vm_fd"]
    assert rec.meta.vms == {(pid, vm): VmName(vmm="kvmtrace", name=NAME, comm=COMM)}


def test_replay_text_names_the_vm(run: RecordedRun) -> None:
    out = _cli("replay", str(run.path))
    assert out.returncode == 0, out.stderr
    pid, vm = run.truth["pid"], run.truth["vm_fd"]
    assert out.stdout.splitlines()[3] == f"VM {pid}:{vm} {NAME} (kvmtrace, {COMM})"


def test_replay_json_names_the_vm(run: RecordedRun) -> None:
    out = _cli("replay", str(run.path), "--json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    pid, vm = run.truth["pid"], run.truth["vm_fd"]
    names = ("pid", "vm", "vm_gen", "name", "vmm", "comm", "rings", "pushes")
    assert [{k: v[k] for k in names} for v in rep["vms"]] == [
        {"pid": pid, "vm": vm, "vm_gen": 0, "name": NAME, "vmm": "kvmtrace", "comm": COMM,
         "rings": 2, "pushes": sum(r["pages_written"] for r in run.truth["rings"])}]
    assert [(r["index"], r["name"]) for r in rep["rings"]] == [(0, NAME), (1, NAME)]


def test_compare_names_the_vms(run: RecordedRun) -> None:
    pid, vm = run.truth["pid"], run.truth["vm_fd"]
    text = _cli("compare", str(run.path), str(V10))
    assert text.returncode in (0, 1), text.stderr
    lines = text.stdout.splitlines()
    assert lines[2] == f"#   VMs: {NAME} (kvmtrace pid {pid})"
    assert "#   VM names: none (recording older than format 1.2)" in lines
    js = json.loads(_cli("compare", str(run.path), str(V10), "--json").stdout)
    assert js["base"]["vms"] == [{"pid": pid, "vm": vm, "vm_gen": 0, "name": NAME,
                                  "vmm": "kvmtrace", "comm": COMM}]
    assert [v["name"] for v in js["new"]["vms"]] == [None]


def test_export_parquet_and_perfetto_name_the_vm(run: RecordedRun, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    pq_out, pf_out = tmp_path / "run.parquet", tmp_path / "run.json"
    assert _cli("export", str(run.path), "--parquet", str(pq_out)).returncode == 0
    table = pq.read_table(pq_out)
    assert set(table["vm_name"].to_pylist()) == {NAME}
    assert table.num_rows == Recording(run.path).events
    assert _cli("export", str(run.path), "--perfetto", str(pf_out)).returncode == 0
    trace = json.loads(pf_out.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = [e["args"]["name"] for e in events if e.get("name") == "process_name"]
    assert names == [f"{NAME} (kvmtrace pid {run.truth['pid']})"]


def test_top_replay_names_the_vm(run: RecordedRun) -> None:
    pid, vm = run.truth["pid"], run.truth["vm_fd"]
    text = _cli("top", "-b", "--replay", str(run.path))
    assert text.returncode == 0, text.stderr
    labels = [ln.split()[:2] for ln in text.stdout.splitlines() if ln.startswith(f"{pid}:")]
    assert labels and all(lab == [f"{pid}:{vm}", NAME] for lab in labels)
    js = _cli("top", "-b", "--json", "--replay", str(run.path))
    vms = [v for line in js.stdout.splitlines() for v in json.loads(line)["vms"]]
    assert vms and {(v["pid"], v["vm"], v["name"], v["comm"]) for v in vms} == {
        (pid, vm, NAME, COMM)}


def test_prometheus_text_names_the_vm(run: RecordedRun) -> None:
    from kvmtrace.analysis.aggregate import Aggregator
    from kvmtrace.views.prometheus import render_metrics

    rec = Recording(run.path)
    agg = Aggregator(rec.meta)
    for batch in rec.batches():
        agg.feed(batch)
    info = [ln for ln in render_metrics(agg.snapshot()).splitlines()
            if ln.startswith("kvmtrace_vm_info{")]
    pid, vm = run.truth["pid"], run.truth["vm_fd"]
    assert len(info) == 1
    assert f'pid="{pid}"' in info[0] and f'vm="{vm}"' in info[0]
    assert f'comm="{COMM}"' in info[0] and f'name="{NAME}"' in info[0]


@pytest.mark.parametrize(("path", "kind"), [(FTRACE, "ftrace"), (PERF, "perf-script")])
def test_text_traces_carry_no_names(path: Path, kind: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    text = _cli("replay", str(path))
    assert f"VM names: none ({kind} text carries no VM names)" in text.stdout.splitlines()
    rep = json.loads(_cli("replay", str(path), "--json").stdout)
    assert rep["vms"] and all(v["name"] is None and v["vmm"] is None for v in rep["vms"])
    assert all(r["name"] is None for r in rep["rings"])
    assert _cli("export", str(path), "--parquet", str(tmp_path / "t.parquet")).returncode == 0
    assert set(pq.read_table(tmp_path / "t.parquet")["vm_name"].to_pylist()) == {None}
    top = _cli("top", "-b", "--json", "--replay", str(path))
    assert top.returncode == 0, top.stderr
    assert all(v["name"] is None for line in top.stdout.splitlines()
               for v in json.loads(line)["vms"])


def test_a_v10_recording_replays_without_names() -> None:
    out = _cli("replay", str(V10))
    assert "VM names: none recorded (a recording older than format 1.2)" in out.stdout
    rep = json.loads(_cli("replay", str(V10), "--json").stdout)
    assert [v["name"] for v in rep["vms"]] == [None]


def test_record_names_a_real_qemu(tmp_path: Path) -> None:
    """QEMU ``-name guest=web01`` with a dirty ring, stopped before its first instruction
    (``-S``): no push, yet the recording names its VM (from the ring-size event)."""
    require(shutil.which("qemu-system-x86_64") is not None,
            "QEMU is not installed (tools/setup.sh --test installs it)")
    require_kvm_bpf()
    out = tmp_path / "qemu.kvt"
    rec = _cli("record", "-o", str(out), "--duration", "3", "--",
               "qemu-system-x86_64", "-name", "guest=web01,debug-threads=on", "-display",
               "none", "-S", "-accel", "kvm,dirty-ring-size=4096", "-nodefaults",
               "-serial", "none", "-monitor", "none")
    assert rec.returncode == 0, rec.stderr
    meta = Recording(out).meta
    assert set(meta.vms.values()) == {VmName(vmm="qemu", name="web01", comm="qemu-system-x86")}
    (pid, vm), = meta.vms
    rep = json.loads(_cli("replay", str(out), "--json").stdout)
    assert rep["vms"] == [{"pid": pid, "vm": vm & 0xFFFFF, "vm_gen": vm >> 20, "name": "web01",
                           "vmm": "qemu", "comm": "qemu-system-x86", "rings": 0, "pushes": 0,
                           "first_ns": None, "last_ns": None, "dirty_rate_mbps": None}]
    assert f"VM {pid}:{vm} web01 (qemu, qemu-system-x86)" in _cli(
        "replay", str(out)).stdout.splitlines()


@pytest.mark.parametrize("try_", range(3))
def test_a_short_lived_vmm_keeps_its_name(try_: int, tmp_path: Path) -> None:
    """Racy by nature: a VMM that ends within a poll of the recorder (20 pages, one vCPU)
    may be gone, or a zombie, when its first events are read; record still names it (from
    its watch of ``-- COMMAND``). tools/soak_names.py runs this many times."""
    require_kvm_bpf()
    name = f"short-{try_}"
    run = record_workload(tmp_path, "--name", name, "--pages", "20")
    assert run.truth["name"] == name
    assert Recording(run.path).meta.vms == {
        (run.truth["pid"], run.truth["vm_fd"]): VmName(vmm="kvmtrace", name=name, comm=COMM)}
