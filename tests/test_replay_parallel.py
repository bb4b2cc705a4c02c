"""Replay on several cores (kvmtrace.analysis.replay.parallel, ``replay -j N``) against the
one-process replay: the same report, field for field, and the same bytes out of
``kvmtrace replay`` (text and --json), on random streams with anomalies (several VMs,
sizes from the meta or inferred), the shared samples, the old recordings of
tests/data/recordings and real recordings of the built-in VMM with several vCPUs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, kvmtrace_cmd, record_workload, require_kvm_bpf
from fuzzing import miscount_block, spoil_block
from test_recording import synthetic
from test_replay_agree import PID, VM, random_stream
from test_replay_columns import assert_same, write

from kvmtrace.analysis.migration import ExtrasTap, replay_extras
from kvmtrace.analysis.replay import ReplayReport, replay_source
from kvmtrace.analysis.replay.parallel import plan_shares, replay_parallel
from kvmtrace.core.events import Kind
from kvmtrace.core.sources import SourceMeta
from kvmtrace.source.detect import open_source
from kvmtrace.source.recording import open_recording
from kvmtrace.views.replay_json import dumps_report
from kvmtrace.views.replay_text import render_text

OLD = sorted((ROOT / "tests" / "data" / "recordings").glob("*.kvt"))


def one_and_many(path: Path, jobs: int, **kw: object) -> tuple[ReplayReport, ReplayReport]:
    """The one-process report and the ``jobs``-process one (which must have run)."""
    tap1, tapn = ExtrasTap(), ExtrasTap()
    one = replay_source(open_recording(path), tap1, **kw)  # type: ignore[arg-type]
    many = replay_parallel(open_recording(path), jobs, tapn, min_events=0, **kw)
    assert many is not None, "the replay was not spread"
    assert replay_extras(lambda: open_recording(path), tap1) == \
        replay_extras(lambda: open_recording(path), tapn)
    assert tap1.push_tids == tapn.push_tids
    assert all(np.array_equal(a, b) for a, b in zip(tap1.rest, tapn.rest, strict=True))
    return one, many


def same_output(a: ReplayReport, b: ReplayReport) -> None:
    assert_same(a, b)
    assert a.rings == b.rings and a.vms == b.vms
    assert dumps_report(a, file="f") == dumps_report(b, file="f")
    assert render_text(a, file="f") == render_text(b, file="f")


@pytest.mark.parametrize("seed", range(8))
def test_random_streams_with_anomalies(tmp_path: Path, seed: int):
    """Two VMs (sizes in the meta: ring by ring), anomalies in both."""
    a, b = random_stream(seed), random_stream(seed + 100)
    b["pid"], b["vm"] = PID + 1, VM + 1
    mix = np.concatenate([a, b])
    mix = mix[np.argsort(mix["ts"], kind="stable")]
    meta = SourceMeta(kind="test", ring_entries={(PID, VM): 256, (PID + 1, VM + 1): 256})
    path = write(tmp_path / "r.kvt", mix, meta, block_events=[37, 200, 611][seed % 3])
    for jobs in (2, 3):
        one, many = one_and_many(path, jobs, keep_harvest=True, window_ns=50_000)
        same_output(one, many)
        assert one.anomalies


def test_sizes_inferred_keep_a_vm_in_one_worker(tmp_path: Path):
    """No sizes in the meta: each VM's size comes from its first soft-full exit, which
    reads all of its rings, so a VM is one unit of work."""
    vms = []
    for i in range(3):
        ev = random_stream(40 + i)
        ev = ev[ev["kind"] != Kind.RING_SIZE]
        ev["pid"], ev["vm"] = PID + i, VM + i
        vms.append(ev)
    mix = np.concatenate(vms)
    mix = mix[np.argsort(mix["ts"], kind="stable")]
    path = write(tmp_path / "u.kvt", mix, block_events=300)
    planned = plan_shares(open_recording(path), 3)
    assert planned is not None
    vm_of = [{k[:2] for k in share} for share in planned[2]]
    assert sorted(len(v) for v in vm_of) == [1, 1, 1]  # a whole VM each
    one, many = one_and_many(path, 3, keep_harvest=True)
    same_output(one, many)
    assert {r.size_source for r in one.rings} == {"inferred"}


def test_the_workload_like_stream(tmp_path: Path):
    ev = synthetic(300_000, vcpus=4, seed=13)
    size = ev[ev["kind"] == Kind.RING_SIZE][0]
    meta = SourceMeta(kind="test", ring_entries={(int(size["pid"]), int(size["vm"])):
                                                 int(size["value"]) // 16})
    path = write(tmp_path / "w.kvt", ev, meta, block_events=4096)
    for jobs in (2, 4):
        one, many = one_and_many(path, jobs)
        same_output(one, many)
    assert [r.pushes for r in one.rings] == np.bincount(
        ev["ring"][ev["kind"] == Kind.PUSH]).tolist()


def test_samples_as_recordings(tmp_path: Path, samples: Path):
    """Imported as recordings with the ring size their names give (as --ring-bytes)."""
    for name, entries in (("ftrace-1vcpu-8192B-800pages.txt", 512),
                          ("perf-script-3vcpu-4096B-400pages.txt", 256)):
        src = open_source(samples / name, ring_entries=entries)
        ev = np.concatenate(list(src.batches()))
        path = write(tmp_path / "s.kvt", ev, src.meta, block_events=100)
        if len({int(r) for r in ev["ring"][ev["kind"] == Kind.PUSH]}) < 2:
            assert replay_parallel(open_recording(path), 2, min_events=0) is None
            continue  # one ring: nothing to spread
        one, many = one_and_many(path, 2, keep_harvest=True)
        same_output(one, many)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd(*args), capture_output=True, text=True, timeout=300)


def same_cli(path: Path, *jobs: str) -> None:
    """``kvmtrace replay`` prints the same bytes, text and --json, whatever -j."""
    for fmt in ((), ("--json",)):
        outs = [cli("replay", str(path), *fmt, "-j", j) for j in jobs]
        for p in outs:
            assert "Traceback" not in p.stderr
        assert len({(p.returncode, p.stdout, p.stderr) for p in outs}) == 1, outs[0].stderr


@pytest.mark.parametrize("old", OLD, ids=[p.name for p in OLD])
def test_old_recordings_cli(old: Path):
    same_cli(old, "1", "2", "3")


def test_jobs_flag_is_checked():
    p = cli("replay", str(OLD[0]), "-j", "0")
    assert p.returncode == 2 and "--jobs 0" in p.stderr and "Traceback" not in p.stderr


def test_a_damaged_block_is_the_same_error(tmp_path: Path):
    ev = synthetic(40_000, vcpus=2, seed=3)
    path = write(tmp_path / "d.kvt", ev, block_events=2048)
    rec = open_recording(path)
    spoil_block(path, rec._index[len(rec._index) // 2][0])  # a block in the middle
    outs = [cli("replay", str(path), "-j", j) for j in ("1", "2", "3")]
    assert outs[0].returncode == 2 and "CRC" in outs[0].stderr
    assert {(p.returncode, p.stdout, p.stderr) for p in outs} == \
        {(outs[0].returncode, outs[0].stdout, outs[0].stderr)}


def test_built_in_vmm_with_several_vcpus(tmp_path: Path):
    """A real recording: 4 vCPUs of the built-in VMM, reaper harvesting; the sizes are in
    the recording's meta, so rings are spread one by one."""
    require_kvm_bpf()
    run = record_workload(tmp_path, "--vcpus", "4", "--ring-bytes", "4096", "--pages", "600",
                          "--exit-every", "1", "--harvest", "reaper")
    planned = plan_shares(open_recording(run.path), 2)
    assert planned is not None and sorted(len(s) for s in planned[2]) == [2, 2]
    one, many = one_and_many(run.path, 2)
    same_output(one, many)
    rings = run.truth["rings"]  # the VMM's own counts
    assert [r.pushes for r in many.rings] == [g["pages_written"] for g in rings] == [600] * 4
    assert [r.soft_full_exits for r in many.rings] == [g["soft_full_exits"] for g in rings]
    assert [r.entries_reset for r in many.rings] == [g["entries_reset"] for g in rings]
    same_cli(run.path, "1", "2", "4")


def test_compare_reads_both_inputs_at_once(tmp_path: Path, samples: Path):
    """``compare -j 2`` profiles NEW in a second process: the same bytes out (JSON and
    text, warnings in order), and the same one-line error when an input is bad."""
    ev = synthetic(60_000, vcpus=2, seed=5)
    base = write(tmp_path / "base.kvt", ev, block_events=4096)
    data = base.read_bytes()
    cut = tmp_path / "cut.kvt"  # a truncated NEW: its warning comes last
    cut.write_bytes(data[:len(data) - 100])
    junk = tmp_path / "junk.txt"
    junk.write_text("nothing here\n")
    ftrace = samples / "ftrace-1vcpu-8192B-800pages.txt"
    for pair in ((base, cut), (cut, base), (ftrace, base), (base, junk), (junk, base)):
        for fmt in ((), ("--json",)):
            outs = [cli("compare", *map(str, pair), *fmt, "-j", j) for j in ("1", "2")]
            assert "Traceback" not in outs[1].stderr
            assert (outs[0].returncode, outs[0].stdout, outs[0].stderr) == \
                (outs[1].returncode, outs[1].stdout, outs[1].stderr)
    assert outs[0].returncode == 2 and "no dirty-ring events" in outs[0].stderr


def test_progress_seam_sees_every_block_in_order(tmp_path: Path):
    ev = synthetic(50_000, vcpus=3, seed=7)
    size = ev[ev["kind"] == Kind.RING_SIZE][0]
    meta = SourceMeta(kind="test", ring_entries={(int(size["pid"]), int(size["vm"])):
                                                 int(size["value"]) // 16})
    path = write(tmp_path / "p.kvt", ev, meta, block_events=3000)
    seen: list[int] = []
    rep = replay_parallel(open_recording(path), 3, min_events=0, on_block=seen.append)
    assert rep is not None and rep.events == len(ev)
    assert seen == [c for _, c in open_recording(path)._index]


def test_arenas_reused_many_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Blocks reach the other workers through shared memory whose bytes are reused once
    every reader is done with a block: with small batches and no decoding ahead the arenas
    hold a few blocks of the hundreds in the file, and the report is still the one-process one
    (a worker reading a block after its bytes were reused would see another block)."""
    from kvmtrace.analysis.replay import engine, parallel
    from kvmtrace.analysis.replay.blockshm import arena_bytes, block_bytes

    monkeypatch.setattr(engine, "COLUMN_BATCH", 300)
    monkeypatch.setattr(parallel, "COLUMN_BATCH", 300)
    monkeypatch.setattr(parallel, "AHEAD", 0)  # arenas of the least room that is safe
    ev = synthetic(60_000, vcpus=4, seed=11)
    size = ev[ev["kind"] == Kind.RING_SIZE][0]
    meta = SourceMeta(kind="test", ring_entries={(int(size["pid"]), int(size["vm"])):
                                                 int(size["value"]) // 16})
    path = write(tmp_path / "a.kvt", ev, meta, block_events=97)
    sizes = [(c, len(t)) for c, t in open_recording(path).group_tables()]
    counts = [c for c, _ in sizes]
    for jobs in (2, 3):  # as replay_parallel sizes them: the stream's events a block spans
        spans = [sum(counts[b:b + jobs]) for b in range(len(sizes))]
        arena = arena_bytes(sizes[::jobs], 300 + 97, 0, spans[::jobs])
        assert arena * 20 < sum(block_bytes(c, g) for c, g in sizes[::jobs])
        one, many = one_and_many(path, jobs, keep_harvest=True, window_ns=50_000)
        same_output(one, many)


@pytest.mark.parametrize("damage", ["count", "crc"])
def test_a_damaged_block_spread_is_the_same_error(tmp_path: Path, damage: str):
    """Rings spread (sizes in the meta), a block in the middle damaged: its CRC, or its
    header (CRC intact) declaring 1000 events fewer than its payload holds (a worker
    decodes it into its arena with room for the declared count only): the error is the
    one-process one, whatever -j."""
    ev = synthetic(40_000, vcpus=2, seed=3)
    size = ev[ev["kind"] == Kind.RING_SIZE][0]
    meta = SourceMeta(kind="test", ring_entries={(int(size["pid"]), int(size["vm"])):
                                                 int(size["value"]) // 16})
    path = write(tmp_path / "h.kvt", ev, meta, block_events=2048)
    assert plan_shares(open_recording(path), 3) is not None  # spread: ring by ring
    off = open_recording(path)._index[9][0]
    if damage == "crc":
        spoil_block(path, off)
        outs = [cli("replay", str(path), "-j", j) for j in ("1", "2", "3")]
        assert outs[0].returncode == 2 and "CRC" in outs[0].stderr
        assert {(p.returncode, p.stdout, p.stderr) for p in outs} == \
            {(outs[0].returncode, outs[0].stdout, outs[0].stderr)}
        return
    count = miscount_block(path, off, 1000)
    outs = [cli("replay", str(path), "-j", j) for j in ("1", "2", "3")]
    assert outs[0].returncode == 2 and f"{count} events, header says {count - 1000}" in \
        outs[0].stderr
    assert {(p.returncode, p.stdout, p.stderr) for p in outs} == \
        {(outs[0].returncode, outs[0].stdout, outs[0].stderr)}
