"""Recordings written by earlier versions stay readable.

``tests/data/recordings/*-v1.0.kvt`` was written by kvmtrace's format 1.0 writer (before
``vm`` packed a generation), recording ``kvmtrace workload --vcpus 2 --ring-bytes 4096
--pages 400 --exit-every 1``; the ``.json`` beside it is that workload's own report (the
VMM's ground truth). Replaying the old file today must give the VMM's numbers exactly.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import ROOT, kvmtrace_cmd

from kvmtrace.source.recording import FORMAT_VERSION, Recording

DATA = ROOT / "tests" / "data" / "recordings"
V10 = DATA / "workload-2vcpu-4096B-400pages-v1.0.kvt"


def _truth() -> dict:
    return json.loads(Path(V10.with_suffix(".json")).read_text())


def test_v10_file_is_what_it_claims():
    rec = Recording(V10)
    assert rec.version == (1, 0) and rec.complete and rec.events == 824
    assert FORMAT_VERSION[0] == 1  # same major: a 1.x reader must read it


def test_v10_recording_replays_to_the_vmms_counts():
    truth = _truth()
    out = subprocess.run(kvmtrace_cmd("replay", str(V10), "--json"), capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["clean"] is True and rep["anomalies"] == []
    rings = {r["index"]: r for r in rep["rings"]}
    assert sorted(rings) == [r["index"] for r in truth["rings"]]
    for t in truth["rings"]:
        r = rings[t["index"]]
        assert (r["pid"], r["vm"], r["vm_gen"]) == (truth["pid"], truth["vm_fd"], 0)
        assert r["pushes"] == t["pages_written"] == 400
        assert r["entries_reset"] == t["entries_reset"] == t["harvested"]
        assert r["soft_full_exits"] == t["soft_full_exits"]
        assert r["resets"] == truth["resets"]
        assert r["lost_page_count"] == t["lost_suspected"] == 0
