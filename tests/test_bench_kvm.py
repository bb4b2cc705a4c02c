"""``kvmtrace bench`` on real guests: the bundle's files, its metadata against the kernel's
own text (/proc, uname), each run's metrics against the built-in VMM's ground truth, and
``kvmtrace compare`` of two bundles: a harvest delay injected into every harvest (20 ms)
is a stall regression in the right direction, and a bundle against itself is quiet.
Same-vs-same bundles of separate runs are measured by tools/bench_fp_rate.py (a rate,
not a test)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import kvmtrace_cmd, record_workload, require_kvm_bpf

import kvmtrace
from kvmtrace.core.events import Kind
from kvmtrace.source.recording import open_recording

WORKLOAD = ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "1000", "--exit-every", "1")
DELAY_US = 20_000
REPS = 3


def bench(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd("bench", "-o", str(out), *args), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    require_kvm_bpf()
    tmp = tmp_path_factory.mktemp("bench")
    out = []
    for name, extra in (("base", ()), ("slow", ("--harvest-delay-us", str(DELAY_US)))):
        p = bench(tmp / name, "--reps", str(REPS), "--", *WORKLOAD, *extra)
        assert p.returncode == 0, p.stderr
        assert "Traceback" not in p.stderr
        out.append(tmp / name)
    return out[0], out[1]


def compare(base: Path, new: Path) -> tuple[int, dict[str, Any]]:
    p = subprocess.run(kvmtrace_cmd("compare", str(base), str(new), "--json"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


def row(d: dict[str, Any], key: str) -> dict[str, Any]:
    (m,) = [m for m in d["metrics"] if m["key"] == key]
    return m


def test_bundle_files_and_metadata(bundles: tuple[Path, Path]):
    base, _ = bundles
    names = [f"rep-{i:03d}.kvt" for i in range(1, REPS + 1)]
    assert sorted(os.listdir(base)) == ["bundle.json", "metrics.json", *names]
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
    assert {stat.S_IMODE((base / n).stat().st_mode) for n in os.listdir(base)} == {0o600}
    meta = json.loads((base / "bundle.json").read_text())
    assert (meta["schema"], meta["kind"], meta["vmm"]) == (1, "kvmtrace-bench",
                                                           "kvmtrace workload")
    assert meta["recordings"] == names and meta["reps"] == REPS
    assert meta["preset"] is None and meta["workload_args"] == list(WORKLOAD)
    assert meta["interrupted"] is False
    assert meta["kvmtrace_version"] == kvmtrace.__version__
    assert meta["kernel"]["release"] == os.uname().release
    assert meta["kernel"]["version"] == os.uname().version
    assert meta["kernel"]["cmdline"] == Path("/proc/cmdline").read_text().strip()
    cpu = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
           .splitlines() if ln.startswith("model name")]
    assert meta["cpu_model"] == cpu[0] and meta["cpus"] == os.cpu_count()


def test_each_run_against_the_vmm_truth(bundles: tuple[Path, Path]):
    for bundle in bundles:
        reps = json.loads((bundle / "metrics.json").read_text())
        assert reps["schema"] == 1 and [r["rep"] for r in reps["reps"]] == [1, 2, 3]
        for r in reps["reps"]:
            truth = r["truth"]
            rings = truth["rings"]
            pushes = sum(x["pages_written"] for x in rings)
            exits = sum(x["soft_full_exits"] for x in rings)
            assert r["pushes"] == pushes == 2000 and r["rings"] == 2
            assert r["soft_full_exits"] == r["stall_count"] == exits
            assert r["soft_full_per_1k"] == exits * 1e3 / pushes
            entries = sum(x["entries_reset"] for x in rings)
            assert r["entries_per_reset"] == entries / (truth["resets"] * 2)
            assert (r["lost_events"], r["overwritten"], r["anomalies"]) == (0, 0, [])
            # the exact stall percentiles are values of the recording's stall events
            ev = np.concatenate(list(open_recording(bundle / r["path"]).batches()))
            stalls = ev["value"][ev["kind"] == Kind.STALL]
            assert len(stalls) == exits
            for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                assert r["stall_ns"][label] == int(np.quantile(stalls, q,
                                                               method="inverted_cdf"))
            span = int(ev["ts"][-1] - ev["ts"][0])
            assert r["span_ns"] == span
            assert r["dirty_mbps"] == pushes * 4096 / 2**20 / (span / 1e9)
            if bundle == bundles[1]:  # every delayed stall lasts at least the delay
                assert int(stalls.min()) >= DELAY_US * 1000


def test_injected_harvest_delay_is_a_stall_regression(bundles: tuple[Path, Path]):
    base, slow = bundles
    rc, d = compare(base, slow)
    assert rc == 1 and d["schema"] == 2 and (d["base"]["runs"], d["new"]["runs"]) == (3, 3)
    m = row(d, "stall_p50")
    assert m["verdict"] == "regression" and m["change_pct"] > 0
    assert m["ci_low_pct"] > m["threshold_pct"]
    assert min(m["new"]) >= DELAY_US * 1000 > max(m["base"])
    # the tail of a loaded host's undelayed runs (p90 of ten stalls) can reach 20 ms too:
    # a verdict there may be "same", never "improvement"
    for key in ("stall_p90", "stall_p99"):
        assert min(row(d, key)["new"]) >= DELAY_US * 1000
        assert row(d, key)["verdict"] in ("regression", "same")
    assert d["anomalies"] == []
    rc, back = compare(slow, base)
    assert rc == 0 and back["regressions"] == 0
    assert row(back, "stall_p50")["verdict"] == "improvement"


def test_a_bundle_against_itself_is_quiet(bundles: tuple[Path, Path]):
    base, _ = bundles
    rc, d = compare(base, base)
    assert rc == 0 and d["regressions"] == d["improvements"] == 0
    assert all(m["change_pct"] == 0.0 for m in d["metrics"] if m["base"])


def test_a_livelocked_vmm_is_a_regression_not_faster_stalls(bundles: tuple[Path, Path],
                                                           tmp_path: Path):
    """A tight guest loop (no exits of its own) overflows the 256-entry ring; the VMM then
    harvests nothing and livelocks on soft-full exits (QEMU's failure, built-in VMM's
    detection). Compared against the base bundle, a trace against a bundle: the anomaly
    is the regression and the stall percentiles get no verdict, whatever their values.
    Overflow shapes vary run to run: what is flagged follows the VMM's own account."""
    base, _ = bundles
    run = record_workload(tmp_path / "livelock", "--exit-every", "0", "--pages", "20000")
    rings = run.truth["rings"]
    lost_pages = sum(r["lost_suspected"] for r in rings)
    rc, d = compare(base, run.path)
    kinds = {a["kind"] for a in d["anomalies"]}
    assert bool(kinds) == bool(lost_pages or run.truth["livelock"])
    assert all(a["verdict"] == "regression" and (a["base_runs"], a["new_runs"]) == (0, 1)
               for a in d["anomalies"])
    if kinds:
        assert rc == 1
        for key in ("stall_p50", "stall_p90", "stall_p99", "reset_lat_p50"):
            assert row(d, key)["verdict"] is None
            assert row(d, key)["note"] == "no verdict: a ring overflowed or got stuck"
    (rep,) = d["new"]["recordings"]
    assert rep["pushes"] == sum(r["pages_written"] for r in rings)


@pytest.mark.parametrize("args, needle", [
    (["--reps", "0"], "--reps 0"),
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--", "--json"], "workload flag --json cannot be given to bench"),
    (["--", "--vcpus", "0"], "--vcpus"),
    (["--", "--passes", "2", "--duration", "1"], "--passes and --duration are exclusive"),
])
def test_bad_flags_one_line_exit_2(tmp_path: Path, args: list[str], needle: str):
    p = bench(tmp_path / "out", *args, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert "error: " in line and needle in line and "(fix: " in line
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_directory(tmp_path: Path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine\n")
    p = bench(tmp_path / "old", timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith("kvmtrace bench: error: -o ") and "is not empty" in line
    assert os.listdir(tmp_path / "old") == ["keep.txt"]


def test_qemu_bundle_against_qemus_own_figures(tmp_path: Path):
    """``bench --qemu``: one QEMU, each run one recorded calc-dirty-rate. On the first run
    (a fresh QEMU: every ring's reset_index starts at 0) the entries QEMU harvested in its
    window, read from the recording's resets, give QEMU's own per-vCPU MB/s exactly; on
    every run QEMU's VM figure is the sum of its per-vCPU ones."""
    import importlib.util
    import shutil

    from conftest import require

    from kvmtrace.testing.qemu import QemuDirtyRate, compare_with_qemu, qemu_mbps

    require_kvm_bpf()
    require(shutil.which("qemu-system-x86_64") is not None, "QEMU not installed")
    require(importlib.util.find_spec("qemu.qmp") is not None, "qemu.qmp not installed")
    out = tmp_path / "q"
    p = bench(out, "--qemu", "--reps", "2", "--", "--vcpus", "2", "--ring-entries", "4096")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["vmm"] == "qemu" and meta["calc_time_s"] == 1
    assert meta["qemu_argv"][0].endswith("qemu-system-x86_64")
    assert "kvm,dirty-ring-size=4096" in meta["qemu_argv"]
    reps = json.loads((out / "metrics.json").read_text())["reps"]
    for i, r in enumerate(reps):
        truth = r["truth"]
        ans = truth["answer"]
        vcpus = {int(v["id"]): int(v["dirty-rate"]) for v in ans["vcpu-dirty-rate"]}
        assert ans["status"] == "measured" and sorted(vcpus) == [0, 1]
        assert ans["dirty-rate"] == sum(vcpus.values())
        ev = open_recording(out / r["path"]).read_all()
        assert r["pushes"] == int((ev["kind"] == Kind.PUSH).sum())
        if i == 0:
            rate = QemuDirtyRate(ans["dirty-rate"], vcpus, ans["calc-time"],
                                 ans["start-time"], truth["asked_ns"], truth["measured_ns"])
            rows = compare_with_qemu(ev, {"rings": []}, rate)
            assert [qemu_mbps(a.harvested, 1000) for a in rows] == [vcpus[0], vcpus[1]]
