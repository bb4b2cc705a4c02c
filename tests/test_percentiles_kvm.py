"""Exact stall percentiles and the ``--hist`` histograms of ``kvmtrace replay`` on a real
recording: the built-in VMM on /dev/kvm, harvesting 5 ms late (``--harvest-delay-us``), so
soft-full stalls last 5 ms and more (one or two delayed harvests): the issue's example,
where replay printed the top of the median's log2 bucket (8.4 ms) as the median.

The truth is computed here from the recording's own events (Kind.STALL and Kind.RESET_LAT
values, read from the file and sorted with numpy): a q-percentile is the value of rank
ceil(q * n) in sorted order, a log2 bucket count is a count of values by bit length."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import RecordedRun, kvmtrace_cmd, record_workload, require_kvm_bpf

from kvmtrace.core.events import Kind
from kvmtrace.source.recording import open_recording

WORKLOAD = ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "3000", "--exit-every", "1",
            "--harvest-delay-us", "5000")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> RecordedRun:
    require_kvm_bpf()
    return record_workload(tmp_path_factory.mktemp("pct") / "delayed", *WORKLOAD)


def _rank(sorted_vals: np.ndarray, q: float) -> int:
    return int(sorted_vals[max(math.ceil(q * len(sorted_vals)), 1) - 1])


def _events(path: Path) -> np.ndarray:
    return open_recording(path).read_all()


def _ms(ns: int) -> str:  # replay's text: 1 decimal of ms from 1 ms up
    return f"{ns / 1e3:.0f}us" if ns < 1e6 else f"{ns / 1e6:.1f}ms"


def _buckets(vals: np.ndarray) -> dict[int, int]:
    """{bucket index: count}: value v in bucket bit_length(v) - 1 (0 also holds 0)."""
    out: dict[int, int] = {}
    for v in vals.tolist():
        b = max(int(v).bit_length() - 1, 0)
        out[b] = out.get(b, 0) + 1
    return out


def _replay(path: Path, *extra: str) -> str:
    p = subprocess.run(kvmtrace_cmd("replay", str(path), *extra), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    return p.stdout


def test_json_and_text_percentiles_are_exact(run: RecordedRun) -> None:
    ev = _events(run.path)
    stalls = ev[ev["kind"] == Kind.STALL]
    d = json.loads(_replay(run.path, "--json"))
    rings = {r["index"]: r for r in d["rings"]}
    assert sorted(rings) == [0, 1]
    text = _replay(run.path).splitlines()
    head = text.index(next(x for x in text if x.split()[:3] == ["ring", "stalls", "p50"]))
    for idx, r in rings.items():
        v = np.sort(stalls["value"][stalls["ring"] == idx].astype(np.int64))
        assert len(v) == run.truth["rings"][idx]["soft_full_exits"]  # the VMM's own count
        p50, p99 = _rank(v, 0.5), _rank(v, 0.99)
        assert r["stall"] == {"count": len(v), "total_ns": int(v.sum()), "p50_ns": p50,
                              "p99_ns": p99, "max_ns": int(v[-1])}
        row = text[head + 1 + idx].split()
        assert row[:5] == [str(idx), str(len(v)), _ms(p50), _ms(p99), _ms(int(v[-1]))]
        # the example: replay used to print the top of the median's log2 bucket
        # (5-10 ms stalls here: 8.4 or 16.8 ms); it prints the median itself now
        bound = 1 << p50.bit_length()
        assert p50 < bound and (row[2] != _ms(bound) or _ms(p50) == _ms(bound))
    lat = np.sort(ev["value"][ev["kind"] == Kind.RESET_LAT].astype(np.int64))
    assert len(lat) == run.truth["resets"]  # the VMM counts its KVM_RESET_DIRTY_RINGS calls
    assert d["reset_latency"] == {"count": len(lat), "total_ns": int(lat.sum()),
                                  "p50_ns": _rank(lat, 0.5), "p99_ns": _rank(lat, 0.99),
                                  "max_ns": int(lat[-1])}


def test_hist_section_counts_the_recorded_values(run: RecordedRun) -> None:
    ev = _events(run.path)
    stall = np.sort(ev["value"][ev["kind"] == Kind.STALL].astype(np.int64))
    lat = np.sort(ev["value"][ev["kind"] == Kind.RESET_LAT].astype(np.int64))
    assert len(lat) == run.truth["resets"]  # the VMM counts its KVM_RESET_DIRTY_RINGS calls
    lines = _replay(run.path, "--hist").splitlines()
    assert max(len(x) for x in lines) <= 80
    for title, vals, what in (
            ("stall time, all rings (soft-full exit to the next KVM_RUN):", stall, "stalls"),
            ("KVM_RESET_DIRTY_RINGS latency, all VMs:", lat, "ioctls")):
        at = lines.index(title)
        assert lines[at + 1] == (f"  {len(vals)} {what}: p50 {_ms(_rank(vals, 0.5))}, p99 "
                                 f"{_ms(_rank(vals, 0.99))}, max {_ms(int(vals[-1]))}")
        assert lines[at + 2].split() == ["nsecs", ":", "count", "distribution"]
        want = _buckets(vals)
        rows = []
        for line in lines[at + 3:]:
            if " -> " not in line:
                break
            lo, _, hi, _, n, *_ = line.split()
            rows.append((int(lo), int(hi), int(n)))
        first, last = min(want), max(want)
        assert rows == [((1 << b) if b else 0, (1 << (b + 1)) - 1, want.get(b, 0))
                        for b in range(first, last + 1)]
