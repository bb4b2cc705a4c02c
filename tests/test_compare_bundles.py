"""``kvmtrace compare`` on bundles (directories of runs, as ``kvmtrace bench`` writes them)
without a kernel: synthetic recordings whose stalls are known exactly, so every per-run
percentile, mean and interval is checked against numbers computed here from the inputs.
Also the ring anomalies (overflow, a livelock's tiny stalls) in single-trace comparisons,
``--threshold METRIC=PCT`` and bad bundles."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import kvmtrace_cmd
from test_compare import CYCLES, lognormal, synth_run

from kvmtrace.analysis.rep_comparison import t_quantile, welch_interval
from kvmtrace.core.sources import SourceMeta
from kvmtrace.source.recording import RecordingWriter
from kvmtrace.testing.synth import SynthVm

STALL_KEYS = ("stall_p50", "stall_p90", "stall_p99")
QS = {"stall_p50": 0.5, "stall_p90": 0.9, "stall_p99": 0.99}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd("compare", *args), capture_output=True, text=True,
                          timeout=120)


def cli_json(*args: str) -> tuple[int, dict[str, Any]]:
    p = cli(*args, "--json")
    assert p.returncode in (0, 1), p.stderr
    (line,) = p.stdout.splitlines()
    return p.returncode, json.loads(line)


def row(d: dict[str, Any], key: str) -> dict[str, Any]:
    (m,) = [m for m in d["metrics"] if m["key"] == key]
    return m


def make_bundle(path: Path, stall_sets: list[np.ndarray]) -> Path:
    """A bundle directory in the layout kvmtrace bench writes (docs: analysis/bundle.py)
    holding one synthetic run per array of stalls."""
    path.mkdir()
    names = []
    lat = lognormal(9, median_ns=8000, sigma=0.3)
    for i, stalls in enumerate(stall_sets, 1):
        names.append(f"rep-{i:03d}.kvt")
        synth_run(path / names[-1], stalls, lat)
    meta = {"schema": 1, "kind": "kvmtrace-bench", "vmm": "synthetic",
            "workload_args": ["--cycles", str(CYCLES)], "recordings": names}
    (path / "bundle.json").write_text(json.dumps(meta))
    return path


def pct(values: np.ndarray, q: float) -> int:
    return int(np.quantile(values, q, method="inverted_cdf"))


@pytest.fixture
def bundles(tmp_path: Path) -> dict[str, Any]:
    base = [lognormal(100 + i, sigma=0.3) for i in range(4)]
    same = [lognormal(200 + i, sigma=0.3) for i in range(4)]
    slow = [2 * s for s in base]
    return {"base": make_bundle(tmp_path / "base", base), "base_stalls": base,
            "same": make_bundle(tmp_path / "same", same),
            "slow": make_bundle(tmp_path / "slow", slow), "slow_stalls": slow}


def test_t_quantiles_against_published_tables():
    # two-sided 95 % (0.975) and 99 % (0.995) values of Student's t, as printed in tables
    for df, t975, t995 in ((1, 12.706, 63.657), (2, 4.303, 9.925), (4, 2.776, 4.604),
                           (10, 2.228, 3.169), (30, 2.042, 2.750), (1e9, 1.960, 2.576)):
        assert round(t_quantile(df), 3) == t975
        assert round(t_quantile(df, 0.995), 3) == t995


def test_welch_interval_by_hand():
    # [1,2,3] vs [4,5,6]: diff 3, variances 1, se = sqrt(2/3), Welch df = 4, t = 2.776445
    lo, hi = welch_interval([1, 2, 3], [4, 5, 6])
    half = 2.776445 * math.sqrt(2 / 3)
    assert (lo, hi) == pytest.approx((3 - half, 3 + half), abs=1e-6)
    assert welch_interval([5], [7]) is None  # one run a side: no interval
    # one run on a side: the other side's variance (df 2, t 4.302653)
    lo, hi = welch_interval([5], [4, 5, 6])
    half = 4.302653 * math.sqrt(1 + 1 / 3)
    assert (lo, hi) == pytest.approx((0 - half, 0 + half), abs=1e-5)
    assert welch_interval([2, 2], [3, 3]) == (1.0, 1.0)  # no spread: the difference itself


def test_doubled_stalls_in_every_run_are_a_regression(bundles: dict[str, Any]):
    rc, d = cli_json(str(bundles["base"]), str(bundles["slow"]))
    assert rc == 1 and d["schema"] == 2
    assert d["interval"] == {"method": "welch-t", "confidence": 1 - 0.05 / 9,
                             "family_confidence": 0.95, "correction": "bonferroni",
                             "judged": 9, "over": "repetition means"}
    assert (d["base"]["runs"], d["new"]["runs"]) == (4, 4)
    assert d["base"]["bundle"]["vmm"] == "synthetic"
    for key in STALL_KEYS:
        m = row(d, key)
        per_run = [pct(s, QS[key]) for s in bundles["base_stalls"]]
        assert m["base"] == per_run and m["base_mean"] == np.mean(per_run)
        assert m["new"] == [pct(s, QS[key]) for s in bundles["slow_stalls"]]
        assert m["change_pct"] == pytest.approx(100.0)  # every value doubled
        lo, hi = welch_interval(m["base"], m["new"], 1 - 0.05 / 9)
        assert m["ci_low_pct"] == pytest.approx(100 * lo / m["base_mean"])
        assert m["ci_high_pct"] == pytest.approx(100 * hi / m["base_mean"])
        assert m["ci_low_pct"] > 0 and m["verdict"] == "regression"
    # timestamps do not depend on the stalls: rates equal in every run, change 0
    for key in ("push_rate_per_vcpu", "dirty_mbps", "soft_full_per_1k"):
        m = row(d, key)
        assert m["change_pct"] == 0.0 and m["verdict"] == "same"
    assert row(d, "soft_full_per_1k")["base"] == [1e3 / 192] * 4  # one exit per 192 pushes
    assert row(d, "entries_per_reset")["verdict"] is None
    assert d["regressions"] == 3 and d["anomalies"] == []
    # the other way round: improvements, exit 0
    rc, back = cli_json(str(bundles["slow"]), str(bundles["base"]))
    assert rc == 0 and back["regressions"] == 0 and back["improvements"] == 3
    assert row(back, "stall_p50")["change_pct"] == pytest.approx(-50.0)


def test_text_report_of_bundles(bundles: dict[str, Any]):
    p = cli(str(bundles["base"]), str(bundles["slow"]))
    assert p.returncode == 1 and p.stderr == ""
    lines = p.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    marked = [line.split() for line in lines if line.endswith("REGRESSION")]
    assert [r[:2] for r in marked] == [["stall", "p50"], ["stall", "p90"], ["stall", "p99"]]
    assert all(r[6] == "+100.0%" for r in marked)
    assert lines[-1] == "3 regression(s): stall p50, stall p90, stall p99"


def test_noise_within_the_threshold_gets_no_verdict(bundles: dict[str, Any]):
    # same distribution, other seeds: stall p99 (the largest of 80 values) moves by
    # +15.2 %, beyond the 10 % threshold, but its interval reaches below it
    rc, d = cli_json(str(bundles["base"]), str(bundles["same"]))
    assert rc == 0 and d["regressions"] == d["improvements"] == 0
    p99 = row(d, "stall_p99")
    assert p99["change_pct"] > 10 and p99["ci_low_pct"] < 10
    assert p99["verdict"] == "same"
    p = cli(str(bundles["base"]), str(bundles["same"]))
    (line,) = [ln for ln in p.stdout.splitlines() if ln.startswith("stall p99")]
    assert line.endswith("~noise")


def test_a_bundle_against_itself(bundles: dict[str, Any]):
    rc, d = cli_json(str(bundles["base"]), str(bundles["base"]))
    assert rc == 0 and d["regressions"] == d["improvements"] == 0
    for m in d["metrics"]:
        assert m["base"] == m["new"] and m["change_pct"] == 0.0, m
        assert m["ci_low_pct"] == -m["ci_high_pct"] and m["verdict"] in (None, "same")


def test_threshold_per_metric(bundles: dict[str, Any]):
    rc, d = cli_json(str(bundles["base"]), str(bundles["slow"]), "--threshold",
                     "stall_p50=150%", "--threshold", "stall p90=150")
    assert rc == 1 and d["thresholds"]["per_metric"]["stall_p50"] == 150.0
    assert row(d, "stall_p50")["verdict"] == row(d, "stall_p90")["verdict"] == "same"
    assert row(d, "stall_p99")["verdict"] == "regression"
    rc, d = cli_json(str(bundles["base"]), str(bundles["slow"]), "--threshold", "150")
    assert rc == 0 and d["thresholds"]["default_pct"] == 150.0


def test_a_trace_against_a_bundle_and_bundles_of_one(bundles: dict[str, Any],
                                                    tmp_path: Path):
    one = bundles["base"] / "rep-001.kvt"
    rc, d = cli_json(str(one), str(bundles["slow"]))
    assert rc == 1 and d["schema"] == 2 and d["base"]["runs"] == 1
    assert d["base"]["bundle"] is None
    assert row(d, "stall_p50")["base"] == [pct(bundles["base_stalls"][0], 0.5)]
    # a bundle of one against a bundle of one: the two traces compared as such (schema 1)
    solo = make_bundle(tmp_path / "solo", [bundles["slow_stalls"][0]])
    rc, d = cli_json(str(one), str(solo))
    assert rc == 1 and d["schema"] == 1 and d["new"]["path"] == str(solo / "rep-001.kvt")


def overflowed(path: Path) -> Path:
    """One 256-entry ring of 300 pushes without an exit (44 entries overwritten), then a
    soft-full exit, a stall, a harvest and a reset."""
    vm = SynthVm(256)
    vm.ring_size_event()
    vm.run(0, [(0, page) for page in range(300)], exit_every=0)
    assert vm.enter(0)
    vm.stall(0, 100)
    vm.harvest()
    vm.reset()
    with RecordingWriter(path, SourceMeta(kind="recording")) as w:
        w.write(vm.events())
    return path


def livelocked(path: Path, stalls: np.ndarray, spins: int = 600) -> Path:
    """The synthetic run of test_compare's synth_run shape for 4 cycles, then the VMM
    harvests nothing: ``spins`` soft-full exits, each with a 300 ns stall, no reset (QEMU
    after an overflow: tiny stalls by the thousand)."""
    vm = SynthVm(256, vcpus=1, pid=77, vm=5)
    vm.ring_size_event()
    for c in range(4):
        vm.run(0, [(1, (c * 192 + i) % 4096) for i in range(192)], exit_every=0)
        assert vm.enter(0)
        vm.stall(0, int(stalls[c]))
        vm.harvest()
        vm.reset()
    vm.run(0, [(1, 9000 + i) for i in range(192)], exit_every=0)
    for _ in range(spins):
        vm.exit(0)
        vm.stall(0, 300)
    with RecordingWriter(path, SourceMeta(kind="recording")) as w:
        w.write(vm.events())
    return path


def test_overflow_in_new_only_is_a_regression(bundles: dict[str, Any], tmp_path: Path):
    base = bundles["base"] / "rep-001.kvt"
    bad = overflowed(tmp_path / "overflow.kvt")
    rc, d = cli_json(str(base), str(bad))
    assert rc == 1 and d["schema"] == 1
    # 44 entries overwritten, and the reset after the harvest walked a whole lap while
    # dirty_index was past it: stranded too (kvmtrace.analysis.stuck)
    assert d["anomalies"] == [
        {"kind": kind, "base_runs": 0, "base_of": 1, "new_runs": 1, "new_of": 1,
         "verdict": "regression"} for kind in ("stranded", "overflow")]
    assert metric_all(d, "overwritten")["new"] == 300 - 256
    stall = [m for m in d["metrics"] if m["name"].startswith("stall p")]
    assert stall and all(m["verdict"] is None for m in stall)  # 100 ns is no improvement
    rc, back = cli_json(str(bad), str(base))
    # (other metrics differ: the two are different workloads)
    assert [a["verdict"] for a in back["anomalies"]] == ["improvement"] * 2
    rc, both = cli_json(str(bad), str(bad))
    assert rc == 0 and [a["verdict"] for a in both["anomalies"]] == [None, None]
    p = cli(str(base), str(bad))
    assert "anomaly: ring overflow in 0/1 base, 1/1 new run(s)  REGRESSION" in p.stdout
    assert p.stdout.splitlines()[-1].startswith(
        f"{d['regressions']} regression(s): ring stranded, ring overflow, ")


def metric_all(d: dict[str, Any], name: str) -> dict[str, Any]:
    (m,) = [m for m in d["metrics"] if m["name"] == name and m["ring"] == "all"]
    return m


def test_livelock_tiny_stalls_are_not_an_improvement(tmp_path: Path):
    stalls = lognormal(5, n=4)
    base = livelocked(tmp_path / "base.kvt", stalls, spins=0)
    spin = livelocked(tmp_path / "spin.kvt", stalls)
    rc, d = cli_json(str(base), str(spin))
    assert rc == 1
    (a,) = d["anomalies"]
    assert (a["kind"], a["verdict"]) == ("no_reset_progress", "regression")
    p50 = metric_all(d, "stall p50")
    assert p50["new"] == 300 and p50["base"] == pct(stalls, 0.5)  # the livelock's stalls
    assert p50["verdict"] is None and d["improvements"] == 0


def test_bundles_with_a_stuck_run(bundles: dict[str, Any], tmp_path: Path):
    stalls = lognormal(5, n=4)
    clean = make_bundle(tmp_path / "clean", [])
    for i in (1, 2):
        livelocked(clean / f"rep-{i:03d}.kvt", stalls, spins=0)
    (clean / "bundle.json").write_text(json.dumps(
        {"schema": 1, "kind": "kvmtrace-bench", "recordings": ["rep-001.kvt", "rep-002.kvt"]}))
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    livelocked(stuck / "rep-001.kvt", stalls, spins=0)
    livelocked(stuck / "rep-002.kvt", stalls)
    (stuck / "bundle.json").write_text(json.dumps(
        {"schema": 1, "kind": "kvmtrace-bench", "recordings": ["rep-001.kvt", "rep-002.kvt"]}))
    rc, d = cli_json(str(clean), str(stuck))
    assert rc == 1 and d["schema"] == 2
    assert d["anomalies"] == [{"kind": "no_reset_progress", "base_runs": 0, "base_of": 2,
                               "new_runs": 1, "new_of": 2, "verdict": "regression"}]
    for key in STALL_KEYS:
        assert row(d, key)["verdict"] is None
        assert row(d, key)["note"] == "no verdict: a ring overflowed or got stuck"


@pytest.mark.parametrize("args, needle", [
    (["{plain}", "{base}"], "is a directory but not a bench bundle"),
    (["{base}", "{nojson}"], "not a bundle's JSON"),
    (["{base}", "{missing}"], "rep-002.kvt is missing"),
    (["{base}", "{base}", "--threshold", "stall_p51=5"], "unknown metric 'stall_p51'"),
    (["{base}", "{base}", "--threshold", "stall_p50=x%"], "--threshold stall_p50=x%"),
])
def test_bad_bundles_one_line_exit_2(bundles: dict[str, Any], tmp_path: Path,
                                     args: list[str], needle: str):
    plain = tmp_path / "plain"
    plain.mkdir()
    nojson = tmp_path / "nojson"
    nojson.mkdir()
    (nojson / "bundle.json").write_text("{")
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "rep-001.kvt").write_bytes((bundles["base"] / "rep-001.kvt").read_bytes())
    (missing / "bundle.json").write_text(json.dumps(
        {"schema": 1, "kind": "kvmtrace-bench", "recordings": ["rep-001.kvt", "rep-002.kvt"]}))
    subst = {"plain": plain, "base": bundles["base"], "nojson": nojson, "missing": missing}
    p = cli(*(a.format(**subst) for a in args))
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith("kvmtrace compare: error: ") and needle in line
    assert "(fix: " in line
