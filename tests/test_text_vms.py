"""Telling VMs apart in text traces (kvmtrace/source/textvms.py) on the kernel's own
`perf script` text: the shared sample (one VM, 3 vCPUs, resets by the vCPU threads) is
played twice by other threads, as a process holding two VMs would print it. Who is who is
known by construction (the copy's thread ids), so every event's VM is checked exactly; the
sample's own counts (400 pushes and 400 entries reset per ring, its resets and exits) are
the per-ring truth. No kernel needed; the real two-VM runs are in test_text_vms_kvm.py."""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import kvmtrace_cmd

from kvmtrace.analysis.aggregate import Aggregator
from kvmtrace.analysis.replay import replay_source
from kvmtrace.core.kvm_abi import VM_UNKNOWN
from kvmtrace.source.detect import open_source

PERF = "perf-script-3vcpu-4096B-400pages.txt"
LINE = re.compile(r"^(\s*python3\s+)(?:(\d+)/)?(\d+)(\s+\[\d+\]\s+)(\d+\.\d{6})(:.*)$")
TIDS = {5406, 5407, 5408}  # the sample's vCPU threads (each also resets the VM)


def lines(samples: Path, *, tid_add: int = 0, us_add: int = 0, pid: int | None = None
          ) -> list[tuple[float, str]]:
    """The sample's event lines (time, text) with thread ids and times shifted."""
    out = []
    for line in (samples / PERF).read_text().splitlines():
        m = LINE.match(line)
        assert m, line
        t = round(float(m[5]) + us_add / 1e6, 6)
        who = f"{pid}/" if pid is not None else ""
        out.append((t, f"{m[1]}{who}{int(m[3]) + tid_add}{m[4]}{t:.6f}{m[6]}"))
    return out


def write(tmp_path: Path, *copies: list[tuple[float, str]]) -> Path:
    merged = sorted((x for c in copies for x in c), key=lambda x: x[0])  # stable: perf's
    path = tmp_path / "two.txt"
    path.write_text("".join(text + "\n" for _, text in merged))
    return path


def sample_counts(samples: Path) -> dict[int, tuple[int, int, int, int]]:
    """Per ring of the sample alone: pushes, entries reset, resets, soft-full exits."""
    rep = replay_source(open_source(samples / PERF, ring_bytes=4096))
    assert rep.anomalies == [] and len(rep.rings) == 3
    out = {r.ring[2]: (r.pushes, r.entries_reset, r.resets, r.soft_full_exits)
           for r in rep.rings}
    assert [v[:2] for v in out.values()] == [(400, 400)] * 3  # the sample's README
    return out


def vm_of_copy(ev: np.ndarray, tids: set[int]) -> set[int]:
    return set(ev["vm"][np.isin(ev["tid"], list(tids))].tolist())


@pytest.mark.parametrize("shift_us", [0, 3, 40])
def test_two_copies_are_two_vms(samples: Path, tmp_path: Path, shift_us: int) -> None:
    path = write(tmp_path, lines(samples), lines(samples, tid_add=1000, us_add=shift_us))
    src = open_source(path, ring_bytes=4096)
    ev = np.concatenate(list(src.batches()))
    assert src.warnings == [] and src.separated
    a, b = vm_of_copy(ev, TIDS), vm_of_copy(ev, {t + 1000 for t in TIDS})
    assert len(a) == len(b) == 1 and a != b and (a | b) == {-2, -3}  # every event, exactly
    truth = sample_counts(samples)
    rep = replay_source(open_source(path, ring_bytes=4096))
    assert rep.anomalies == []
    want = {(vm, i): c for vm in (-2, -3) for i, c in truth.items()}
    assert {(r.ring[1], r.ring[2]): (r.pushes, r.entries_reset, r.resets, r.soft_full_exits)
            for r in rep.rings} == want
    agg = Aggregator(src.meta)
    agg.feed(ev)
    assert {(k.vm, k.ring): (c.pushes, c.entries_reset, c.resets, c.soft_full_exits)
            for k, c in agg.snapshot().rings.items()} == want


def test_other_processes_keep_vm_unknown(samples: Path, tmp_path: Path) -> None:
    """pid/tid text: process 5400 holds two VMs, process 6000 one; only 5400's rings get
    synthetic ids."""
    path = write(tmp_path, lines(samples, pid=5400),
                 lines(samples, tid_add=1000, us_add=5, pid=5400),
                 lines(samples, tid_add=2000, us_add=9, pid=6000))
    rep = replay_source(open_source(path, ring_bytes=4096))
    assert rep.anomalies == []
    assert sorted(r.ring for r in rep.rings) == sorted(
        [(5400, vm, i) for vm in (-2, -3) for i in range(3)]
        + [(6000, VM_UNKNOWN, i) for i in range(3)])


def test_a_reset_that_changes_nothing_is_unplaced(samples: Path, tmp_path: Path) -> None:
    """A third thread resets the VM (which one the text cannot say) after both finished:
    every ring already at dirty = reset = 0x190, so it changes nothing either way."""
    extra = [(6156.9, f"         python3  7777 [000]  6156.900000:  kvm:kvm_dirty_ring_reset:"
                      f" ring {i}: dirty 0x190 reset 0x190 (used 0)") for i in range(3)]
    path = write(tmp_path, lines(samples), lines(samples, tid_add=1000, us_add=3), extra)
    src = open_source(path, ring_bytes=4096)
    ev = np.concatenate(list(src.batches()))
    assert src.warnings == ["3 reset event(s) that changed no ring could be any of several "
                            "VMs' (the text cannot tell): counted under vm -1"]
    assert set(ev["vm"][ev["tid"] == 7777].tolist()) == {VM_UNKNOWN}
    proc = subprocess.run(kvmtrace_cmd("replay", str(path), "--ring-bytes", "4096",
                                       "--json"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stderr == f"kvmtrace replay: warning: {src.warnings[0]}\n"
    d = json.loads(proc.stdout)
    assert d["warnings"] == src.warnings and d["anomalies"] == []
    rows = {(r["vm"], r["index"]): (r["pushes"], r["resets"]) for r in d["rings"]}
    truth = sample_counts(samples)
    assert rows == {**{(vm, i): (400, truth[i][2]) for vm in (-2, -3) for i in range(3)},
                    **{(-1, i): (0, 1) for i in range(3)}}


def test_a_reset_that_fits_two_vms_leaves_them_unsure(samples: Path, tmp_path: Path
                                                      ) -> None:
    """The first copy's last reset call moves to a thread that pushes nothing and the
    second copy's last call is gone: that call then fits (and moves) both VMs' rings. The
    rings are named, the warning says so, and no anomaly is claimed for them."""
    one = lines(samples)
    last = [k for k, (_, text) in enumerate(one) if "ring_reset" in text][-3:]
    for k in last:
        t, text = one[k]
        one[k] = (t, re.sub(r"^(\s*python3\s+)\d+", r"\g<1>7777", text))
    two = lines(samples, tid_add=1000, us_add=3)
    drop = [k for k, (_, text) in enumerate(two) if "ring_reset" in text][-3:]
    two = [x for k, x in enumerate(two) if k not in drop]
    path = write(tmp_path, one, two)
    src = open_source(path, ring_bytes=4096)
    list(src.batches())
    assert src.unsure == {(0, vm, i) for vm in (-2, -3) for i in range(3)}
    (warning,) = src.warnings
    assert warning.startswith("the text cannot tell some resets apart (ring 0 of vm -3, ")
    assert warning.endswith("): their rings' anomalies are not reported")
    proc = subprocess.run(kvmtrace_cmd("replay", str(path), "--ring-bytes", "4096",
                                       "--json"), capture_output=True, text=True, timeout=60)
    d = json.loads(proc.stdout)
    assert d["warnings"] == [warning] and d["anomalies"] == [] and proc.returncode == 0
    resets = Counter()
    for r in d["rings"]:
        resets[r["index"]] += r["resets"]
    assert resets == {i: 2 * sample_counts(samples)[i][2] - 1 for i in range(3)}


def test_reading_the_file_again_gives_the_same_events(samples: Path, tmp_path: Path
                                                      ) -> None:
    """Events that do not fit the cache are read from the file a second time; small chunks
    split the trace (and its reset bursts) across batches."""
    path = write(tmp_path, lines(samples), lines(samples, tid_add=1000, us_add=3))
    whole = np.concatenate(list(open_source(path, ring_bytes=4096).batches()))
    src = open_source(path, ring_bytes=4096)
    src.chunk_bytes = 1 << 16
    src.cache_bytes = 0
    parts = list(src.batches())
    assert len(parts) > 3
    again = np.concatenate(parts)
    assert (again == whole).all() and set(again["vm"].tolist()) == {-2, -3}
