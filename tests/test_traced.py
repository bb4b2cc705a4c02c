"""The trace-driven guest (``workload --replay``) without KVM: the plan read from events,
the memory layout, the marked guest loop on the test interpreter of test_guest, bad traces."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from conftest import kvmtrace_cmd
from test_guest import execute

from kvmtrace.core.events import Kind, empty
from kvmtrace.errors import UsageError
from kvmtrace.host.kvm import PAGE_SIZE
from kvmtrace.vmm.guest import GUEST_PORT, MARK_PORT, assemble
from kvmtrace.vmm.traced import (
    MAX_TRACE_SPAN,
    MAX_TRACE_VCPUS,
    TraceLayout,
    plan_from_events,
)


def events(rows: list[tuple]) -> np.ndarray:
    """EVENT_DTYPE from (kind, ring, slot, offset) rows (pid 7, vm 5)."""
    ev = empty(len(rows))
    for i, (kind, ring, slot, offset) in enumerate(rows):
        ev[i]["kind"], ev[i]["ring"], ev[i]["slot"], ev[i]["value"] = kind, ring, slot, offset
        ev[i]["pid"], ev[i]["vm"], ev[i]["ts"] = 7, 5, i
    return ev


P, R = Kind.PUSH, Kind.RESET


def test_plan_orders_rings_and_marks_resets_and_rewrites():
    ev = events([(P, 1, 0, 9), (P, 0, 0, 3), (P, 0, 2, 4), (R, 0, 0, 0), (R, 1, 0, 0),
                 (P, 0, 0, 3), (P, 0, 0, 5), (P, 0, 0, 5), (P, 1, 0, 9), (R, 0, 0, 0)])
    plan = plan_from_events([ev[:4], ev[4:]], "t", ring_entries=512)
    assert [r.key for r in plan.rings] == [(7, 5, 0), (7, 5, 1)]
    r0, r1 = plan.rings
    assert list(zip(r0.slots.tolist(), r0.offsets.tolist(), strict=True)) == [
        (0, 3), (2, 4), (0, 3), (0, 5), (0, 5)]
    # reset after 2 pushes -> mark at 2; offset 5 written again since -> mark at 4;
    # the reset after the last push (5) is the final harvest's, no mark
    assert r0.marks.tolist() == [False, False, True, False, True]
    assert r0.resets == 1
    assert r1.marks.tolist() == [False, True]  # reset after 1 push (and a re-write)
    assert plan.writes == 7 and plan.marks == 3 and plan.ring_entries == 512


def test_layout_slots_keep_their_ids_and_code_is_not_logged():
    ev = events([(P, 0, 0, 3), (P, 0, 2, 4), (P, 1, 2, 0x30)])
    lay = TraceLayout(plan_from_events([ev], "t"))
    regions = lay.regions()
    assert [(r.slot, r.log_dirty) for r in regions] == [(1, False), (0, True), (2, True)]
    code_pages = 1 + 1 + 1  # code, one table page per vCPU
    assert regions[0].gpa == 0 and regions[0].size == code_pages * PAGE_SIZE
    assert regions[1].gpa == code_pages * PAGE_SIZE and regions[1].size == 4 * PAGE_SIZE
    assert regions[2].gpa == (code_pages + 4) * PAGE_SIZE
    assert regions[2].size == 0x31 * PAGE_SIZE
    s2 = regions[2].gpa
    # the first write of a pass is marked (bit 0): every pass starts with a harvest
    assert list(lay.table(0)) == [regions[1].gpa + 3 * PAGE_SIZE + 1, s2 + 4 * PAGE_SIZE]
    assert list(lay.table(1)) == [s2 + 0x30 * PAGE_SIZE + 1]
    assert lay.written_entries(0, 1) == {(0, 3)}
    assert lay.written_entries(0, 9) == {(0, 3), (2, 4)}


@pytest.mark.parametrize("exit_every,passes", [(0, 1), (1, 1), (3, 1), (1, 2)])
def test_marked_guest_writes_the_trace_in_order(exit_every, passes):
    pages = [3, 4, 3, 8, 8, 9, 3]
    ev = events([(P, 0, 0, p) for p in pages[:3]] + [(R, 0, 0, 0)]
                + [(P, 0, 0, p) for p in pages[3:]])
    lay = TraceLayout(plan_from_events([ev], "t"))
    code = assemble(exit_every, mark_port=MARK_PORT)
    mem: dict[int, int] = {}
    for i, b in enumerate(lay.table(0).tobytes()):
        mem[lay.table_gpa(0) + i] = b
    regs = lay.initial_regs(0, passes, exit_every, code)
    writes, outs, _, final = execute(code.code, mem, regs)
    base = lay.regions()[1].gpa
    assert [w // PAGE_SIZE * PAGE_SIZE for w in writes] == [
        base + p * PAGE_SIZE for p in pages] * passes
    marks = [2, 3, 4]  # a re-write of 3, the trace's reset after 3 pushes, a re-write of 8
    assert marks == np.flatnonzero(lay.plan.rings[0].marks).tolist()
    assert outs.count(MARK_PORT) == (1 + len(marks)) * passes  # and each pass's first write
    assert outs.count(GUEST_PORT) == (len(pages) * passes // exit_every if exit_every else 0)
    assert final["rdx"] == len(pages) * passes and final["rip"] == code.labels["done"]


def test_a_ring_without_pushes_halts_at_once():
    ev = events([(P, 0, 0, 1), (R, 1, 0, 0)])
    lay = TraceLayout(plan_from_events([ev], "t"))
    code = assemble(1, mark_port=MARK_PORT)
    assert lay.vcpus == 2 and lay.initial_regs(1, 1, 1, code)["rip"] == code.labels["done"]
    _, outs, steps, final = execute(code.code, {}, lay.initial_regs(1, 1, 1, code))
    assert outs == [] and steps == 0 and final["rdx"] == 0


@pytest.mark.parametrize("rows,message", [
    ([(R, 0, 0, 0)], "no kvm_dirty_ring_push events"),
    ([(P, -1, 0, 1)], "without a ring"),
    ([(P, 0, 1 << 16 | 1, 1)], "address space 1"),
    ([(P, i, 0, 1) for i in range(MAX_TRACE_VCPUS + 1)], f"has {MAX_TRACE_VCPUS + 1} rings"),
])
def test_bad_traces_are_one_line(rows, message):
    with pytest.raises(UsageError, match=message) as info:
        plan_from_events([events(rows)], "t.txt")
    assert "\n" not in str(info.value)


def test_offsets_beyond_the_span_are_refused():
    top = MAX_TRACE_SPAN // PAGE_SIZE
    TraceLayout(plan_from_events([events([(P, 0, 0, top - 100)])], "t"))
    with pytest.raises(UsageError, match=r"slot 3 offset 0xc0000000 needs .* MiB"):
        TraceLayout(plan_from_events([events([(P, 0, 3, 0xC0000000)])], "t"))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd("workload", *args), capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("args,message", [
    (["--replay", "/nonexistent.kvt"], "cannot read"),
    (["--vcpus", "2"], "drop --vcpus"),
    (["--pattern", "hot", "--seed", "3"], "drop --pattern --seed"),
])
def test_cli_bad_replay_is_one_line(samples, args, message):
    if args[0] != "--replay":
        args = ["--replay", str(samples / "ftrace-1vcpu-8192B-800pages.txt"), *args]
    proc = run_cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def test_cli_refuses_a_trace_without_pushes(tmp_path, samples):
    text = (samples / "ftrace-1vcpu-8192B-800pages.txt").read_text().splitlines()
    only = tmp_path / "resets.txt"
    only.write_text("\n".join(line for line in text if "kvm_dirty_ring_push" not in line))
    proc = run_cli("--replay", str(only))
    assert proc.returncode == 2 and "no kvm_dirty_ring_push events" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", ["--dump-harvest", "--pid-file"])
def test_cli_never_writes_over_the_trace(tmp_path, samples, flag):
    trace = tmp_path / "trace.txt"
    original = (samples / "ftrace-1vcpu-8192B-800pages.txt").read_bytes()
    trace.write_bytes(original)
    proc = run_cli("--replay", str(trace), flag, str(trace))
    assert proc.returncode == 2 and "would be overwritten" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert trace.read_bytes() == original
