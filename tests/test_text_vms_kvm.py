"""Text traces of two VMs in one process (issue 8, item 5): tracefs and `perf script` text
carry no VM fd, yet the importer tells the four rings apart (pushes by thread, resets by
index continuity) and replay, top --replay and compare give each VM's own counts exactly,
with no anomaly and no warning, against the VMM's ground truth."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import kvmtrace_cmd, require
from textcapture import TRACEFS, VM_WORKLOADS, capture_vms, counts, vmm_counts_by_vm

from kvmtrace.analysis.aggregate import Aggregator
from kvmtrace.analysis.profile import profile_source
from kvmtrace.analysis.replay import replay_source
from kvmtrace.source.detect import open_source

pytestmark = pytest.mark.kernel

SCENARIOS = {name: VM_WORKLOADS[name] for name in ("reaper-exits", "fast-reaper")}
SAME = VM_WORKLOADS["same-vms"]  # identical VMs: exact, or the importer warns


def capture(how: str, flags: tuple[str, ...], tmp_path: Path
            ) -> tuple[Path, list[dict[str, Any]]]:
    require(Path("/dev/kvm").exists(), "no /dev/kvm")
    if how == "tracefs":
        require((TRACEFS / "instances").is_dir(), "tracefs not mounted")
    else:
        require(shutil.which("perf") is not None, "perf not installed (linux-perf)")
    for _ in range(3):
        path, truth, whole = capture_vms(how, flags, tmp_path / f"{how}.txt")
        for vm in truth:  # the runs themselves were clean
            assert vm["lost_suspected"] == 0 and vm["reset_returned"] == vm["entries_reset"]
        # perf on a busy host now and then writes a perf.data that lacks events (no loss
        # reported): the text then lacks pushes or resets the VMM made, whatever the
        # importer does
        if whole:
            return path, truth
    raise AssertionError(f"three {how} captures lacked pushes the VMM made")


def expected(truth: list[dict[str, Any]], ev: np.ndarray) -> dict[tuple[int, int], tuple]:
    """Per (synthetic vm, ring index): the VMM's pages written, entries reset, resets and
    soft-full exits. A VM's synthetic id is the one its vCPU threads' pushes carry."""
    out = vmm_counts_by_vm(truth, ev)
    vids = {vid for vid, _ in out}
    assert None not in vids and max(vids) <= -2, vids  # one synthetic id per VM
    assert len(vids) == len(truth)  # and different VMs, different ids
    return out


@pytest.mark.parametrize("attempt", range(2))  # racy: each attempt is a fresh run
@pytest.mark.parametrize("how", ["tracefs", "perf"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_two_vms_in_one_process_told_apart(scenario: str, how: str, attempt: int,
                                           tmp_path: Path) -> None:
    path, truth = capture(how, SCENARIOS[scenario], tmp_path)
    ring_bytes = truth[0]["ring_bytes"]
    src = open_source(path, ring_bytes=ring_bytes)
    ev = np.concatenate(list(src.batches()))
    assert src.bad_lines == 0 and src.lost == 0
    assert src.warnings == [] and src.unsure == set() and src.separated
    want = expected(truth, ev)

    agg = Aggregator(src.meta)  # what top --replay and compare count
    for batch in open_source(path, ring_bytes=ring_bytes).batches():
        agg.feed(batch)
    snap = agg.snapshot()
    assert {(k.vm, k.ring): counts(c) for k, c in snap.rings.items()} == want
    assert sum(c.lost for c in snap.rings.values()) == 0

    prof = profile_source(open_source(path, ring_bytes=ring_bytes))
    for idx in (0, 1):  # compare adds the rings of one index across VMs
        mine = [v for (vm, i), v in want.items() if i == idx]
        row = prof.rings[idx]
        assert counts(row) == tuple(sum(v[j] for v in mine) for j in range(4))
        assert row.overwritten == 0
    # the replay counts the same and finds nothing wrong in a clean run; with a reaper
    # racing the vCPUs this also needs its causal order of a reset and the pushes around
    # it (issue 8, item 2) and no no_exit when a reset landed before the next guest entry
    # (item 4)
    rep = replay_source(open_source(path, ring_bytes=ring_bytes))
    assert {(r.ring[1], r.ring[2]): counts(r) for r in rep.rings} == want
    assert rep.anomalies == []


@pytest.mark.parametrize("attempt", range(2))
def test_identical_vms_exact_or_warned(tmp_path: Path, attempt: int) -> None:
    """Never silently wrong: either every VM's counts are exact, or the importer said
    which resets it could not place (and then only those are missing)."""
    path, truth = capture("tracefs", SAME, tmp_path)
    src = open_source(path, ring_bytes=4096)
    ev = np.concatenate(list(src.batches()))
    want = expected(truth, ev)
    agg = Aggregator(src.meta)
    agg.feed(ev)
    got = {(k.vm, k.ring): counts(c) for k, c in agg.snapshot().rings.items()}
    if not src.warnings:
        assert got == want
        return
    unplaced = {i: v[2] for (vm, i), v in got.items() if vm == -1}
    assert src.unplaced == sum(unplaced.values()) and not src.unsure
    for (vm, i), v in want.items():  # what is missing is the unplaced resets, no more
        assert got[(vm, i)][:2] == v[:2] and got[(vm, i)][3] == v[3]
    for i in (0, 1):
        assert sum(got[(vm, i)][2] for vm in (-2, -3)) + unplaced[i] == sum(
            v[2] for (vm, x), v in want.items() if x == i)


def test_cli_json_has_no_warning_and_exits_0(tmp_path: Path) -> None:
    path, truth = capture("tracefs", SCENARIOS["reaper-exits"], tmp_path)
    proc = subprocess.run(kvmtrace_cmd("replay", str(path), "--ring-bytes", "4096", "--json"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["warnings"] == [] and d["anomalies"] == [] and proc.stderr == ""
    assert sorted({r["vm"] for r in d["rings"]}) == [-3, -2]
    assert sum(r["pushes"] for r in d["rings"]) == sum(
        r["pages_written"] for vm in truth for r in vm["rings"])
