"""``workload --replay`` on real KVM: a rerun of a trace pushes, ring by ring, the same
multiset of (slot, offset) as the trace did.

Ground truth: the source workload's own harvest (``--dump-harvest``: every entry the VMM
collected), the kernel's own text (tests/data/samples), and the recordings' push events.
Every guest write on this host pushes one entry (nested KVM), and the replay writes exactly
the trace's pushes, so the comparison is exact, as sequences per ring where one thread
harvested in push order.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import kvmtrace_cmd, record_workload
from textcapture import held, tracefs_capture

from kvmtrace.core.events import Kind
from kvmtrace.source.detect import open_source

pytestmark = pytest.mark.kernel

# the kernel's push line, in tracefs and perf script text alike
PUSH_TEXT = re.compile(r"kvm_dirty_ring_push: ring (\d+): dirty \S+ reset \S+ slot (\d+) "
                       r"offset (0x[0-9a-f]+)")


def push_multisets(path: Path) -> tuple[dict[int, Counter], int]:
    """Per ring index, the multiset of (slot, offset) of a recording's push events, and
    the events the tracer lost (tools/soak_trace_replay.py uses it too)."""
    src = open_source(path)
    out: dict[int, Counter] = {}
    for batch in src.batches():
        push = batch[batch["kind"] == Kind.PUSH]
        for ring, slot, offset in zip(push["ring"].tolist(), push["slot"].tolist(),
                                      push["value"].tolist(), strict=True):
            out.setdefault(ring, Counter())[(slot, offset)] += 1
    return out, src.lost


def recorded_pushes(path: Path) -> dict[int, Counter]:
    """:func:`push_multisets` of a recording that lost no event."""
    out, lost = push_multisets(path)
    assert lost == 0
    return out


def text_pushes(path: Path) -> dict[int, list[tuple[int, int]]]:
    """Per ring, the (slot, offset) the kernel's text shows pushed, in order."""
    out: dict[int, list[tuple[int, int]]] = {}
    for m in PUSH_TEXT.finditer(path.read_text()):
        out.setdefault(int(m[1]), []).append((int(m[2]), int(m[3], 16)))
    return out


def harvested(dump: dict) -> list[list[tuple[int, int]]]:
    return [[tuple(e) for e in ring["harvested"]] for ring in dump["rings"]]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rerun_of_a_recording_pushes_its_multiset(tmp_path, kvm, bpf_root, seed):
    """2 vCPUs x 500 pages in random order, 2 passes (every page pushed twice per ring),
    recorded; then the recording replayed under record. Both recordings, and both VMMs'
    harvests, hold the same per-ring pushes."""
    src = record_workload(tmp_path / "src", "--vcpus", "2", "--pages", "500", "--passes",
                          "2", "--pattern", "random", "--seed", str(seed))
    rep = record_workload(tmp_path / "rep", "--replay", str(src.path))
    assert src.truth["lost_suspected"] == 0 == rep.truth["lost_suspected"]
    source, rerun = recorded_pushes(src.path), recorded_pushes(rep.path)
    # the source recording holds exactly what its VMM harvested
    assert source == {i: Counter(h) for i, h in enumerate(harvested(src.dump))}
    assert sorted(source) == [0, 1] and all(c.total() == 1000 for c in source.values())
    assert all(set(c.values()) == {2} for c in source.values())
    assert rerun == source
    # one harvester per ring, in push order: the replay's harvests are the source's
    assert harvested(rep.dump) == harvested(src.dump)
    truth = rep.truth
    assert truth["pattern"] == "trace" and truth["replay"] == str(src.path)
    assert truth["vcpus"] == 2 and truth["ring_entries"] == src.truth["ring_entries"]
    for ring in truth["rings"]:
        assert ring["pages_written"] == ring["harvested"] == 1000
        assert ring["distinct"] == 500 and ring["unexpected"] == 0
        assert ring["exits"]["io"] == 1000 + ring["marks"] and ring["halted"]


def test_rerun_of_perf_script_text_records_its_pushes(tmp_path, kvm, bpf_root, samples):
    """The kernel's perf script text of 3 vCPUs x 400 pages, replayed under record."""
    sample = samples / "perf-script-3vcpu-4096B-400pages.txt"
    rep = record_workload(tmp_path / "rep", "--replay", str(sample))
    kernel = text_pushes(sample)
    assert {r: len(s) for r, s in kernel.items()} == {0: 400, 1: 400, 2: 400}
    assert recorded_pushes(rep.path) == {r: Counter(s) for r, s in kernel.items()}
    assert harvested(rep.dump) == [kernel[r] for r in range(3)]


def test_rerun_of_ftrace_text(tmp_path, kvm, samples):
    """The kernel's tracefs text of 1 vCPU x 800 pages (ring 512 entries); replayed into a
    256-entry ring with an I/O exit every 16 writes, the VMM harvests what the text shows."""
    sample = samples / "ftrace-1vcpu-8192B-800pages.txt"
    dump = tmp_path / "h.json"
    proc = subprocess.run(kvmtrace_cmd("workload", "--replay", str(sample), "--exit-every",
                                       "16", "--json", "--dump-harvest", str(dump)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    truth = json.loads(proc.stdout)
    kernel = text_pushes(sample)
    assert list(kernel) == [0] and len(kernel[0]) == 800
    assert harvested(json.loads(dump.read_text())) == [kernel[0]]
    ring = truth["rings"][0]
    assert ring["pages_written"] == ring["harvested"] == ring["distinct"] == 800
    # a harvest before the first write, and where the text's first reset came (after 448
    # pushes; its second came after the last push)
    assert ring["marks"] == 2 and ring["exits"]["io"] == 800 // 16 + 2


def test_rerun_of_an_overflowing_source_pushes_every_entry(tmp_path, kvm, bpf_root):
    """300 writes with no exit into a 256-entry ring: the kernel pushes all 300 entries
    whether the ring overflowed (44 overwritten) or a host tick let the vCPU exit in time;
    both shapes are accepted, and the replay (an exit after every write, no overflow)
    pushes the same 300, each page once."""
    src = record_workload(tmp_path / "src", "--pages", "300", "--exit-every", "0")
    assert src.truth["lost_suspected"] in (0, 44)
    rep = record_workload(tmp_path / "rep", "--replay", str(src.path))
    source = recorded_pushes(src.path)
    assert source == {0: Counter((0, 0x100 + i) for i in range(300))}
    assert recorded_pushes(rep.path) == source
    ring = rep.truth["rings"][0]
    assert rep.truth["lost_suspected"] == 0 and ring["harvested"] == ring["distinct"] == 300


def test_rerun_of_a_tracefs_capture(tmp_path, kvm, bpf_root):
    """A workload with hot-set re-writes (each ring writes some pages many times), its
    kernel text captured through a private tracefs instance, replayed: the replay's VMM
    harvests, ring by ring, exactly what the source's VMM harvested and the text shows."""
    src_dump, rep_dump = tmp_path / "src.json", tmp_path / "rep.json"
    text, stdout = tracefs_capture(tmp_path / "trace.txt", held(kvmtrace_cmd(
        "workload", "--vcpus", "2", "--pages", "300", "--pattern", "hot", "--seed", "4",
        "--json", "--dump-harvest", str(src_dump))))
    assert json.loads(stdout)["lost_suspected"] == 0
    source = harvested(json.loads(src_dump.read_text()))
    kernel = text_pushes(text)
    assert [kernel[r] for r in sorted(kernel)] == source
    assert all(len(s) == 600 and len(set(s)) == 300 for s in source)
    proc = subprocess.run(kvmtrace_cmd("workload", "--replay", str(text), "--json",
                                       "--dump-harvest", str(rep_dump)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert harvested(json.loads(rep_dump.read_text())) == source
    for ring in json.loads(proc.stdout)["rings"]:
        assert ring["pages_written"] == ring["harvested"] == 600 and ring["distinct"] == 300
