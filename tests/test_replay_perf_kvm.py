"""A run traced at once by `kvmtrace record` and by `perf record -a` of the dirty-ring
tracepoints imports (recording; `perf script` text, detected) to the same per-ring event
sequence, and both replay to the same counters and harvest (issue 4, item 6)."""

from __future__ import annotations

import shutil
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import record_workload, require, require_kvm_bpf
from textcapture import PerfSession

from kvmtrace.analysis.replay import Replay, replay_source
from kvmtrace.core.events import EVENT_DTYPE, Kind
from kvmtrace.source.detect import detect_format, open_source
from kvmtrace.source.recording import open_recording

pytestmark = pytest.mark.kernel

CLEAN = ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "1000", "--exit-every", "1")


def pairs(items: Any) -> Counter[tuple[int, int]]:
    return Counter((int(s), int(o)) for s, o in items)


def ring_sequences(ev: np.ndarray) -> dict[int, list[tuple[int, ...]]]:
    """Per ring, (kind, dirty_index, reset_index, slot, offset) of push/reset/exit events
    in order. kvm_dirty_ring_exit carries only the vCPU id, so an exit is (EXIT, ring)."""
    out: dict[int, list[tuple[int, ...]]] = {}
    for e in ev[np.isin(ev["kind"], [Kind.PUSH, Kind.RESET, Kind.EXIT])]:
        k, ring = int(e["kind"]), int(e["ring"])
        if k == Kind.EXIT:
            t: tuple[int, ...] = (k, int(e["slot"]))
        else:
            t = (k, int(e["dirty_index"]), int(e["reset_index"]), int(e["slot"]),
                 int(e["value"]))
        out.setdefault(ring, []).append(t)
    return out


@pytest.fixture
def perf_recorder(tmp_path: Path) -> Iterator[Callable[[], Path]]:
    """`perf record -a` of the dirty-ring tracepoints, recording (perf acknowledged its
    enable) before the test's workload starts. Yields stop() -> the `perf script` text."""
    require_kvm_bpf()
    require(shutil.which("perf") is not None,
            "perf not installed (tools/setup.sh --test: linux-perf)")
    with PerfSession(tmp_path) as perf:

        def stop() -> Path:
            err = perf.stop()
            # perf ends by re-raising SIGINT once perf.data is complete
            assert perf.returncode in (0, -signal.SIGINT), err
            assert "Captured and wrote" in err
            text = tmp_path / "perf.txt"
            perf.script(text, ns=True)
            return text

        yield stop


def test_kvmtrace_and_perf_agree_event_for_event(tmp_path: Path,
                                                 perf_recorder: Callable[[], Path]) -> None:
    run = record_workload(tmp_path / "rec", *CLEAN)
    text = perf_recorder()
    truth = run.truth
    assert detect_format(text) == "perf-script"
    src = open_source(text, ring_bytes=4096)  # text does not tell the ring size
    theirs = np.concatenate(list(src.batches()) or [np.zeros(0, EVENT_DTYPE)])
    assert src.bad_lines == 0 and src.lost == 0
    theirs = theirs[theirs["pid"] == truth["pid"]]  # perf -a also saw other VMs, if any
    ours = open_recording(run.path).read_all()
    assert set(ours["pid"].tolist()) == {truth["pid"]}
    a, b = ring_sequences(ours), ring_sequences(theirs)
    assert sorted(a) == sorted(b) == [0, 1]
    for ring in truth["rings"]:
        seq_ours, seq_perf = a[ring["index"]], b[ring["index"]]
        kinds = Counter(t[0] for t in seq_ours)
        assert kinds == {Kind.PUSH: 1000, Kind.RESET: truth["resets"],
                         Kind.EXIT: ring["soft_full_exits"]}
        assert len(seq_perf) == len(seq_ours)
        assert seq_perf == seq_ours
    # and both replay to the same per-ring counters and harvest
    mine = replay_source(open_source(run.path), keep_harvest=True)
    rp = Replay(src.meta, keep_harvest=True)  # only this run's events
    rp.feed(theirs)
    other = rp.finish()
    assert other.anomalies == [] and mine.anomalies == []
    assert [x.ring for x in other.rings] == [(truth["pid"], -1, 0), (truth["pid"], -1, 1)]
    assert mine.harvested is not None and other.harvested is not None
    for r in mine.rings:
        p = next(x for x in other.rings if x.ring[2] == r.ring[2])
        assert (p.pushes, p.resets, p.entries_reset, p.soft_full_exits, p.max_used) == (
            r.pushes, r.resets, r.entries_reset, r.soft_full_exits, r.max_used)
        assert pairs(other.harvested[p.ring]) == pairs(mine.harvested[r.ring])
