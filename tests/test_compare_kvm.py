"""``kvmtrace compare`` on real recordings: a workload whose VMM delays every harvest by
20 ms against the same workload without the delay. The stalls (exit 31 to the next KVM_RUN,
timed by the probes) must come out as a regression one way and an improvement the other,
and the per-ring counts must equal the workloads' own ground truth."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import RecordedRun, kvmtrace_cmd, record_workload, require_kvm_bpf

WORKLOAD = ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "1000", "--exit-every", "1")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[RecordedRun, RecordedRun]:
    require_kvm_bpf()
    tmp = tmp_path_factory.mktemp("compare")
    fast = record_workload(tmp / "default", *WORKLOAD)
    slow = record_workload(tmp / "delayed", *WORKLOAD, "--harvest-delay-us", "20000")
    return fast, slow


def compare(base: Path, new: Path) -> tuple[int, dict[str, Any]]:
    p = subprocess.run(kvmtrace_cmd("compare", str(base), str(new), "--json"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode in (0, 1) and p.stderr == "", p.stderr
    return p.returncode, json.loads(p.stdout)


def metric(d: dict[str, Any], name: str, ring: int | str = "all") -> dict[str, Any]:
    (m,) = [m for m in d["metrics"] if m["name"] == name and m["ring"] == ring]
    return m


def test_delayed_harvest_is_a_stall_regression(runs: tuple[RecordedRun, RecordedRun]):
    fast, slow = runs
    rc, d = compare(fast.path, slow.path)
    assert rc == 1 and d["regressions"] > 0
    assert d["base"]["stall_source"] == d["new"]["stall_source"] == "stall events"
    assert (d["base"]["lost"], d["new"]["lost"]) == (0, 0)
    for ring in (0, 1, "all"):
        m = metric(d, "stall p50", ring)
        assert m["ratio"] > 10 and m["verdict"] == "regression" and m["significant"]
        # the injected delay is 20 ms per harvest: every delayed stall is at least that
        assert metric(d, "stall p50", ring)["new"] >= 20_000_000 > m["base"]
    assert metric(d, "push rate")["verdict"] == "regression"
    for side, run in (("base", fast), ("new", slow)):
        truth = run.truth
        for r in truth["rings"]:
            i = r["index"]
            assert metric(d, "pushes", i)[side] == r["pages_written"] == 1000
            assert metric(d, "stall count", i)[side] == r["soft_full_exits"]
            assert metric(d, "soft-full exits/10k", i)[side] == \
                r["soft_full_exits"] * 1e4 / r["pages_written"]
            assert metric(d, "max used", i)[side] == truth["soft_limit"]
            assert metric(d, "overwritten", i)[side] == 0
        assert metric(d, "pushes")[side] == sum(r["pages_written"] for r in truth["rings"])
        assert metric(d, "reset latency count")[side] == truth["resets"]
        entries = sum(r["entries_reset"] for r in truth["rings"])
        assert metric(d, "entries per reset")[side] == entries / (truth["resets"] * 2)


def test_removing_the_delay_is_an_improvement(runs: tuple[RecordedRun, RecordedRun]):
    fast, slow = runs
    rc, d = compare(slow.path, fast.path)
    assert rc == 0 and d["regressions"] == 0
    for ring in (0, 1, "all"):
        m = metric(d, "stall p50", ring)
        assert m["ratio"] < 0.1 and m["verdict"] == "improvement"
    assert metric(d, "push rate")["verdict"] == "improvement"
