"""``kvmtrace compare`` without a kernel: synthetic recordings written with RecordingWriter
whose stalls are known exactly, the shared samples, bad input; plus the reservoir and the
stall pairing of text traces. Verdicts need the threshold and the bootstrap."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import kvmtrace_cmd

from kvmtrace.analysis.distribution import Reservoir
from kvmtrace.analysis.profile import STALL_EVENTS, STALL_EXIT_TO_PUSH, profile_source
from kvmtrace.core.events import Kind, empty
from kvmtrace.core.sources import EventSource, SourceMeta
from kvmtrace.source.recording import RecordingWriter, open_recording
from kvmtrace.testing.synth import SynthVm

FTRACE = "ftrace-1vcpu-8192B-800pages.txt"
PERF = "perf-script-3vcpu-4096B-400pages.txt"
CYCLES = 40  # soft-full cycles per ring: 40 stalls per ring, 80 in all
STALL_PCT = ("stall p50", "stall p90", "stall p99")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd("compare", *args), capture_output=True, text=True,
                          timeout=120)


def cli_json(*args: str) -> tuple[int, dict[str, Any]]:
    p = cli(*args, "--json")
    assert p.returncode in (0, 1), p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1
    return p.returncode, json.loads(lines[0])


def metric(d: dict[str, Any], name: str, ring: int | str = "all") -> dict[str, Any]:
    (m,) = [m for m in d["metrics"] if m["name"] == name and m["ring"] == ring]
    return m


def synth_run(path: Path, stalls: np.ndarray, reset_lat: np.ndarray) -> Path:
    """Two vCPUs of a 256-entry ring, CYCLES soft-full cycles each (ring 0 then ring 1);
    after every soft-full exit the vCPU stalls ``stalls[k]`` ns, then the VMM harvests and
    resets (one KVM_RESET_DIRTY_RINGS taking ``reset_lat[k]`` ns). Timestamps do not depend
    on the values, so two runs differ only in their distributions."""
    vm = SynthVm(256, vcpus=2, pid=77, vm=5)
    vm.ring_size_event()
    k = 0
    for c in range(CYCLES):
        for ring in (0, 1):
            vm.run(ring, [(1, (c * 192 + i) % 4096) for i in range(191)], exit_every=0)
            vm.push(ring, 1, 4000 + c)
            assert vm.enter(ring)
            vm.stall(ring, int(stalls[k]))
            vm.harvest()
            vm.reset()
            k += 1
    ev = vm.events()
    resets = ev["ts"][(ev["kind"] == Kind.RESET) & (ev["ring"] == 1)]
    lat = empty(len(resets))
    lat["ts"], lat["kind"], lat["pid"], lat["vm"] = resets + 1, Kind.RESET_LAT, 77, 5
    lat["value"] = reset_lat[:len(resets)]
    ev = np.concatenate((ev, lat))
    ev = ev[np.argsort(ev["ts"], kind="stable")]
    with RecordingWriter(path, SourceMeta(kind="recording")) as w:
        w.write(ev)
    return path


def lognormal(seed: int, n: int = 2 * CYCLES, median_ns: float = 200_000,
              sigma: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(median_ns * rng.lognormal(0.0, sigma, n)).astype(np.int64)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    stalls, lat = lognormal(1, sigma=0.3), lognormal(9, median_ns=8000, sigma=0.3)
    base = synth_run(tmp_path / "base.kvt", stalls, lat)
    new = synth_run(tmp_path / "new.kvt", 2 * stalls, lat)
    return base, new, stalls


def test_doubled_stalls_are_a_regression_with_ratio_2(pair: tuple[Path, Path, np.ndarray]):
    base, new, stalls = pair
    rc, d = cli_json(str(base), str(new))
    assert rc == 1 and d["schema"] == 1
    assert d["base"]["path"] == str(base) and d["new"]["source"] == "recording"
    assert d["base"]["stall_source"] == STALL_EVENTS and d["base"]["sampled"] is False
    regressed = {(m["name"], m["ring"]) for m in d["metrics"] if m["verdict"] == "regression"}
    assert regressed == {(n, r) for n in STALL_PCT for r in (0, 1, "all")}
    assert d["regressions"] == 9 and d["improvements"] == 0
    for name in ("stall p50", "stall p99", "stall max"):
        for ring in (0, 1, "all"):
            assert metric(d, name, ring)["ratio"] == 2.0
    for ring, part in ((0, stalls[0::2]), (1, stalls[1::2]), ("all", stalls)):
        m = metric(d, "stall p50", ring)
        assert m["base"] == int(np.quantile(part, 0.5, method="inverted_cdf"))
        assert m["significant"] is True
        assert metric(d, "stall count", ring)["base"] == len(part)
    for name in ("pushes", "push rate", "reset latency p50", "max used", "lost events"):
        assert metric(d, name)["ratio"] == 1.0
    assert metric(d, "pushes", 0)["base"] == CYCLES * 192
    assert metric(d, "soft-full exits/10k", 1)["base"] == CYCLES * 1e4 / (CYCLES * 192)
    assert metric(d, "entries per reset", "all")["base"] == 192 / 2
    assert metric(d, "max used")["verdict"] == "same" and metric(d, "max used")["base"] == 192
    assert metric(d, "reset latency count")["base"] == CYCLES * 2
    # the other way round: an improvement, exit 0
    rc, back = cli_json(str(new), str(base))
    assert rc == 0 and back["regressions"] == 0 and back["improvements"] == 9
    assert metric(back, "stall p50")["ratio"] == 0.5


def test_text_report_80_columns_and_markers(pair: tuple[Path, Path, np.ndarray]):
    base, new, _ = pair
    p = cli(str(base), str(new))
    assert p.returncode == 1 and p.stderr == ""
    lines = p.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    marked = [line.split() for line in lines if line.endswith("REGRESSION")]
    assert len(marked) == 9 and all(row[-2] == "+100.0%" for row in marked)
    assert lines[-1].startswith("9 regression(s): stall p50 (all)")


def test_file_against_itself_every_ratio_1(pair: tuple[Path, Path, np.ndarray]):
    base, _, _ = pair
    rc, d = cli_json(str(base), str(base))
    assert rc == 0 and d["regressions"] == d["improvements"] == 0
    assert len(d["metrics"]) == 2 * 14 + 14 + 5 + 1  # rings 0, 1, all (+reset, lost)
    for m in d["metrics"]:
        assert m["base"] == m["new"] is not None and m["ratio"] == 1.0, m
        assert m["verdict"] in (None, "same")
    p = cli(str(base), str(base))
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == "no regression"


def test_noise_only_difference_gets_no_verdict(tmp_path: Path):
    lat = lognormal(9, median_ns=8000, sigma=0.3)
    a = synth_run(tmp_path / "a.kvt", lognormal(11), lat)
    b = synth_run(tmp_path / "b.kvt", lognormal(12), lat)
    rc, d = cli_json(str(a), str(b))
    assert rc == 0 and d["regressions"] == d["improvements"] == 0
    pct = [m for m in d["metrics"] if m["name"] in STALL_PCT]
    assert all(m["verdict"] == "same" for m in pct)
    # the threshold alone would have judged: the bootstrap is what held the verdicts back
    beyond = [m for m in pct if abs(m["change_pct"]) > 10]
    assert beyond and all(m["significant"] is False for m in beyond)
    # a threshold of 0 still needs significance
    rc, d0 = cli_json(str(a), str(b), "--threshold", "0")
    assert rc == 0 and d0["regressions"] == d0["improvements"] == 0


def test_samples_ftrace_against_perf(samples: Path):
    rc, d = cli_json(str(samples / FTRACE), str(samples / PERF))
    assert (d["base"]["source"], d["new"]["source"]) == ("ftrace", "perf-script")
    assert (d["base"]["events"], d["new"]["events"]) == (803, 1217)
    assert metric(d, "pushes", 0)["base"] == 800 and metric(d, "pushes")["base"] == 800
    assert [metric(d, "pushes", r)["new"] for r in (0, 1, 2, "all")] == [400, 400, 400, 1200]
    assert metric(d, "pushes", 1)["base"] is None and metric(d, "pushes", 1)["ratio"] is None
    assert d["base"]["stall_source"] == d["new"]["stall_source"] == STALL_EXIT_TO_PUSH
    assert metric(d, "stall count")["base"] == 1 and metric(d, "stall count")["new"] == 2
    assert metric(d, "stall p50")["significant"] is False  # one value cannot be significant
    assert metric(d, "entries per reset", 0)["base"] == 400.0  # 800 entries in 2 resets
    assert rc == (1 if d["regressions"] else 0)
    p = cli(str(samples / PERF), str(samples / FTRACE), "--ring-bytes", "4096")
    assert p.returncode in (0, 1) and p.stderr == ""
    assert max(len(line) for line in p.stdout.splitlines()) <= 80


def test_measured_against_derived_stalls_get_no_verdict(pair, samples: Path):
    base, _, _ = pair
    rc, d = cli_json(str(base), str(samples / FTRACE))
    assert d["stalls_comparable"] is False
    pct = [m for m in d["metrics"] if m["name"] in STALL_PCT]
    assert len(pct) == 3 * 3 and all(m["verdict"] is None for m in pct)  # rings 0, 1, all
    assert metric(d, "stall p50", 0)["ratio"] is not None
    p = cli(str(base), str(samples / FTRACE))
    assert "# warning: stalls were timed differently" in p.stdout


def test_derived_stall_pairs_exit_with_next_push_of_its_ring_across_batches(samples: Path):
    ev = empty(4)
    ev["ts"] = [100, 200, 350, 400]
    ev["kind"] = [Kind.EXIT, Kind.PUSH, Kind.PUSH, Kind.PUSH]
    ev["ring"] = [0, 1, 0, 0]
    ev["dirty_index"] = [0, 1, 1, 2]

    class Split(EventSource):
        meta = SourceMeta(kind="ftrace")
        lost = 0

        def batches(self) -> Iterator[np.ndarray]:
            yield ev[:2]
            yield ev[2:]

    prof = profile_source(Split())
    assert prof.stall_source == STALL_EXIT_TO_PUSH and prof.span_ns == 300
    assert prof.rings[0].stall_ns.values.tolist() == [250]
    assert prof.rings[1].stall_ns.seen == 0 and prof.rings["all"].pushes == 3


def test_reservoir_keeps_all_then_a_uniform_sample():
    r = Reservoir(1000)
    r.add(np.arange(600))
    r.add(np.arange(600, 900))
    assert not r.sampled and r.values.tolist() == list(range(900))
    big = Reservoir(10_000)
    for start in range(0, 2_000_000, 65_536):
        big.add(np.arange(start, min(start + 65_536, 2_000_000)))
    kept = big.values
    assert big.sampled and big.seen == 2_000_000 and len(kept) == 10_000
    assert len(np.unique(kept)) == 10_000 and kept.max() < 2_000_000
    # uniform over the whole stream, not the first or last values: every fifth holds ~2000
    counts = np.bincount(kept // 400_000, minlength=5)
    assert counts.min() > 1800 and counts.max() < 2200


def test_profile_says_sampled_when_capped(pair: tuple[Path, Path, np.ndarray]):
    base, _, _ = pair
    prof = profile_source(open_recording(base), cap=10)
    assert prof.sampled and prof.rings["all"].stall_ns.seen == 2 * CYCLES
    assert len(prof.rings["all"].stall_ns.values) == 10


def test_truncated_recording_warns_and_compares(pair, tmp_path: Path):
    base, _, _ = pair
    cut = tmp_path / "cut.kvt"
    data = base.read_bytes()
    cut.write_bytes(data[:len(data) - 100])
    assert open_recording(cut).truncated
    p = cli(str(base), str(cut))
    assert p.returncode in (0, 1) and "ends early" in p.stderr
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, needle", [
    (["/nonexistent/a.kvt", "{ftrace}"], "cannot read /nonexistent/a.kvt"),
    (["{tmp}", "{ftrace}"], "is a directory"),
    (["{ftrace}", "{junk}"], "no dirty-ring events recognised"),
    (["{ftrace}", "{ftrace}", "--threshold", "-5"], "--threshold -5"),
    (["{ftrace}", "{ftrace}", "--threshold", "nan"], "--threshold nan"),
    (["{ftrace}", "{ftrace}", "--ring-entries", "300"], "--ring-entries 300"),
])
def test_bad_input_one_line_exit_2(samples: Path, tmp_path: Path, args: list[str],
                                   needle: str):
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\n")
    subst = {"ftrace": str(samples / FTRACE), "tmp": str(tmp_path), "junk": str(junk)}
    p = cli(*(a.format(**subst) for a in args))
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith("kvmtrace compare: error: ") and needle in line
    assert "(fix: " in line
