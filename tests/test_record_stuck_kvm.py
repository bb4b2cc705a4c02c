"""``kvmtrace record``'s summary line names stuck rings (issue F item 8), against the
built-in VMM: a ring is named exactly when the VMM lost pages to an overflow or livelocked."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import ROOT, kvmtrace_cmd

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("pages", [300, 3000])
def test_summary_names_the_stuck_ring(kvm, bpf_root, tmp_path, pages):
    for _run in range(2):
        out = tmp_path / "run.kvt"
        proc = subprocess.run(
            kvmtrace_cmd("record", "-o", str(out), "--",
                         *kvmtrace_cmd("workload", "--vcpus", "1", "--ring-bytes", "4096",
                                       "--pages", str(pages), "--exit-every", "0", "--json")),
            capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        truth = json.loads(proc.stdout)
        (t,) = truth["rings"]
        (summary,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("recorded ")]
        named = re.findall(r"(\d+):(-?\d+):(-?\d+) (\w+)", summary.partition("STUCK rings: ")[2])
        if t["lost_suspected"] or truth["livelock"]:
            assert [(int(p), int(v) & 0xFFFFF, int(r)) for p, v, r, _why in named] == [
                (truth["pid"], truth["vm_fd"], 0)]
            assert named[0][3] in ("stranded", "no_reset_progress")
        else:
            assert "STUCK" not in summary and named == []
        out.unlink()
