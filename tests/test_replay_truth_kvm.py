"""The replay against the built-in VMM's ground truth on real runs (issue 8, items 2-4 and
10), traced three ways: ``kvmtrace record``, a pid-filtered tracefs instance (the kernel's
own text) and ``perf record`` + plain ``perf script`` (microsecond timestamps).

Per ring, exactly: pushes = the guest's pages written, entries reset and soft-full exits =
the VMM's, lost pages = the VMM's page for page; no anomaly on a run that lost nothing.
The racy scenarios (a reaper resetting while the vCPU pushes) run 3 times each here and
20 times in tools/soak_replay.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require, require_kvm_bpf
from replay_capture import (
    AHEAD,
    INCOMPLETE,
    PAGES_DIFFER,
    Run,
    clean,
    compare,
    perf_run,
    record_run,
    tracefs_run,
    truth_lost_pages,
)

from kvmtrace.analysis.replay import replay_source
from kvmtrace.model.results import AnomalyKind
from kvmtrace.source.detect import open_source
from kvmtrace.testing.reference import ReferenceReplay

pytestmark = pytest.mark.kernel

REAPER = ("--exit-every", "0", "--harvest", "reaper", "--reaper-ms", "1")
TIGHT = ("--vcpus", "1", "--ring-bytes", "4096", "--exit-every", "0")
FORMATS = {"recording": record_run, "ftrace": tracefs_run, "perf-script": perf_run}


@pytest.fixture(params=sorted(FORMATS))
def capture(request: pytest.FixtureRequest):  # noqa: ANN201
    require_kvm_bpf()
    if request.param == "perf-script":
        require(shutil.which("perf") is not None,
                "perf not installed (tools/setup.sh --test: linux-perf)")
    return FORMATS[request.param]


def assert_reference_agrees(run: Run) -> None:
    """The fast replay and the plain reference model give the same rings, anomalies and
    harvest on the real trace (its races included), field by field."""
    kw = {} if run.fmt == "recording" else {"ring_bytes": run.truth["ring_bytes"]}
    src = open_source(run.path, **kw)
    ev = np.concatenate(list(src.batches()))
    ref = ReferenceReplay(src.meta)
    ref.feed(ev)
    want = ref.finish()
    fast = replay_source(open_source(run.path, **kw), keep_harvest=True)
    assert [r.compare_key() for r in fast.rings] == [r.compare_key()
                                                     for r in want.rings.values()]
    assert [a.key() for a in fast.anomalies] == [a.key() for a in want.anomalies]
    assert fast.harvested is not None
    assert {k: sorted(v) for k, v in fast.harvested.items()} == want.harvested


def assert_exact(run: Run, which_pages: bool = True) -> None:
    """Everything :func:`replay_capture.compare` checks; ``which_pages=False``: the number
    of lost pages exactly, not which (a harvest in flight during an overflow, see there)."""
    anomalies, bad = compare(run)
    bad = [b for b in bad if not b.startswith(AHEAD)]  # pages not comparable: see there
    assert not any(b.startswith(INCOMPLETE) for b in bad), bad  # the capture failed
    if not which_pages:
        bad = [b for b in bad if not b.startswith(PAGES_DIFFER)]
    assert bad == [], bad
    if clean(run):
        assert anomalies == 0


@pytest.mark.parametrize("vcpus", ["1", "2"])
@pytest.mark.parametrize("attempt", range(3))
def test_fast_reaper_exact(capture, vcpus: str, attempt: int, tmp_path: Path) -> None:
    """A reaper resetting every 1 ms while the vCPUs push: resets and pushes race. Clean
    runs replay with no anomaly; runs where the guest outran the reaper (it overflows now
    and then) replay with the VMM's number of lost pages, and with the very pages unless
    a harvest was in flight during the overflow (about 1 run in 10 of those here)."""
    run = capture(tmp_path, "--vcpus", vcpus, *REAPER)
    assert_exact(run, which_pages=False)
    assert_reference_agrees(run)


@pytest.mark.parametrize("pages", ["300", "600", "3000"])
def test_tight_loop_lost_pages_page_for_page(capture, pages: str, tmp_path: Path) -> None:
    """A single pass of a tight loop overflows the 256-entry ring: the overwritten entries
    and those stranded behind the stuck reset position are the VMM's lost pages."""
    run = capture(tmp_path, *TIGHT, "--pages", pages)
    assert_exact(run)
    assert_reference_agrees(run)
    kw = {} if run.fmt == "recording" else {"ring_bytes": 4096}
    rep = replay_source(open_source(run.path, **kw))
    (ring,) = rep.rings
    lost = truth_lost_pages(run, 0)
    assert len(lost) == run.truth["rings"][0]["lost_suspected"]
    assert ring.lost_page_count == len(lost)
    assert [(s, o) for s, o, _ in ring.lost_pages] == lost
    # single pass: every page pushed once, so each lost page lost one entry
    assert all(n == 1 for _, _, n in ring.lost_pages)
    assert ring.overwritten + ring.stranded == len(lost)
    kinds = {a.kind for a in rep.anomalies}
    if lost:
        assert AnomalyKind.OVERFLOW in kinds
        assert ring.stuck == (AnomalyKind.STUCK in kinds)
        assert ring.stuck or ring.stranded == 0
    else:  # an interrupt made the vCPU take its soft-full exit in time
        assert rep.anomalies == []


@pytest.mark.parametrize("attempt", range(3))
def test_exits_every_8_pages_with_reaper_no_no_exit(capture, attempt: int,
                                                    tmp_path: Path) -> None:
    """Pushes past the soft limit followed by a reset before the vCPU's next guest entry
    are the kernel's rule (the soft-full request is dropped): no ``no_exit``."""
    run = capture(tmp_path, "--vcpus", "1", "--exit-every", "8", "--harvest", "reaper",
                  "--pages", "5000", "--passes", "3")
    assert run.truth["lost_suspected"] == 0
    assert_exact(run)
