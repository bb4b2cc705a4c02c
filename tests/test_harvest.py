"""Harvesting logic on a fake ring in memory, config validation and result formatting."""

from __future__ import annotations

import json
import struct

import pytest

from kvmtrace.core.kvm_abi import KVM_DIRTY_GFN_F_DIRTY as DIRTY
from kvmtrace.core.kvm_abi import KVM_DIRTY_GFN_F_RESET as RESET
from kvmtrace.errors import UsageError
from kvmtrace.vmm.reset import CallOutcome, RingReset, attribute_reset, reset_run, ring_reset
from kvmtrace.vmm.truth import RingTruth, WorkloadResult
from kvmtrace.vmm.vm import MappedRing, check_ring_bytes
from kvmtrace.vmm.workload import WorkloadConfig


class FakeKernel:
    """Pushes entries the way kvm_dirty_ring_push does: slot at dirty_index & mask."""

    def __init__(self, entries: int) -> None:
        self.buf = bytearray(16 * entries)
        self.entries = entries
        self.dirty_index = 0

    def push(self, slot: int, offset: int) -> None:
        i = self.dirty_index % self.entries
        struct.pack_into("<IIQ", self.buf, 16 * i, DIRTY, slot, offset)
        self.dirty_index += 1

    def flags(self, i: int) -> int:
        return struct.unpack_from("<I", self.buf, 16 * i)[0]

    def reset(self, reset_index: int) -> int:
        """Like kvm_dirty_ring_reset: clear RESET entries from reset_index; returns new."""
        while reset_index < self.dirty_index:
            i = reset_index % self.entries
            if not self.flags(i) & RESET:
                break
            struct.pack_into("<I", self.buf, 16 * i, 0)
            reset_index += 1
        return reset_index


def test_harvest_marks_reset_and_stops_at_first_clean():
    k = FakeKernel(8)
    for off in (0x100, 0x101, 0x102):
        k.push(0, off)
    ring = MappedRing(k.buf, 8)
    assert ring.harvest() == [(0, 0x100), (0, 0x101), (0, 0x102)]
    assert ring.fetch == 3
    assert [k.flags(i) for i in range(4)] == [RESET, RESET, RESET, 0]
    assert ring.harvest() == []
    assert ring.fetch == 3


def test_harvest_reads_slot_and_64bit_offset():
    k = FakeKernel(4)
    k.push(7, 0x1_2345_6789)
    assert MappedRing(k.buf, 4).harvest() == [(7, 0x1_2345_6789)]


def test_fetch_index_wraps():
    k = FakeKernel(4)
    ring = MappedRing(k.buf, 4)
    reset_index = 0
    got = []
    for off in range(11):
        k.push(1, off)
        if off % 3 == 2:
            got += ring.harvest()
            reset_index = k.reset(reset_index)
    got += ring.harvest()
    assert got == [(1, off) for off in range(11)]
    assert ring.fetch == 11 and k.reset(reset_index) == 11


def test_harvest_limit_and_budget():
    k = FakeKernel(8)
    for off in range(8):
        k.push(0, off)
    ring = MappedRing(k.buf, 8)
    assert len(ring.harvest(limit=3)) == 3
    assert ring.harvest() == [(0, off) for off in range(3, 8)]
    assert ring.harvest() == []


def test_overflow_loses_the_overwritten_entries():
    """300 pushes into 256 slots: harvesting finds the 256 newest, pages 0..43 are gone."""
    k = FakeKernel(256)
    for page in range(300):
        k.push(0, page)
    got = MappedRing(k.buf, 256).harvest()
    assert len(got) == 256
    assert {off for _, off in got} == set(range(44, 300))


def test_ring_rejects_bad_sizes():
    with pytest.raises(ValueError):
        MappedRing(bytearray(16 * 6), 6)
    with pytest.raises(ValueError):
        MappedRing(bytearray(16), 4)


@pytest.mark.parametrize("size", [0, 2048, 4095, 6144, 12288])
def test_check_ring_bytes_rejects(size):
    with pytest.raises(UsageError):
        check_ring_bytes(size)


def test_check_ring_bytes_max():
    check_ring_bytes(4096, 1 << 20)
    check_ring_bytes(1 << 20, 1 << 20)
    with pytest.raises(UsageError, match="maximum 1048576"):
        check_ring_bytes(1 << 21, 1 << 20)


@pytest.mark.parametrize("kwargs", [
    dict(vcpus=0), dict(vcpus=65), dict(passes=0), dict(duration_s=0.0),
    dict(pattern="zipf"), dict(harvest="eager"), dict(exit_every=-1), dict(reaper_ms=-1),
    dict(harvest="lazy", reaper_ms=0), dict(ring_bytes=5000), dict(pages=0),
    dict(vms=0), dict(vms=17), dict(vm_cycles=0), dict(migrate_ms=0.0),
])
def test_config_rejects(kwargs):
    with pytest.raises(UsageError):
        WorkloadConfig(**kwargs).validate()


def _result() -> WorkloadResult:
    rings = [RingTruth(index=0, pages_written=10, harvested=9, distinct=9, lost_suspected=1,
                        entries_reset=9, run_ns=1_000_000),
             RingTruth(index=1, pages_written=10, harvested=10, distinct=10,
                        entries_reset=10, run_ns=2_000_000)]
    return WorkloadResult(
        pid=1, vm_fd=5, cap=223, ring_bytes=4096, ring_entries=256, soft_limit=192, vcpus=2,
        pages=10, passes=1, duration_s=None, pattern="seq", seed=0, exit_every=1,
        harvest="on-full", reaper_ms=10, harvest_delay_us=0, rings=rings, resets=3,
        harvest_log=[[(0, 0x100)] * 9, [(0, 0x10A)] * 10])


def test_result_json_and_dump():
    res = _result()
    data = json.loads(res.to_json())
    assert data["lost_suspected"] == 1 and data["entries_reset"] == 19
    assert data["vm_fd"] == 5 and data["rings"][1]["harvested"] == 10
    assert "harvest_log" not in data
    dump = res.harvest_dump()
    assert [len(r["harvested"]) for r in dump["rings"]] == [9, 10]
    assert dump["rings"][0]["harvested"][0] == [0, 0x100]
    assert res.rings[0].pushes_per_s == 9000.0


def test_summary_fits_80_columns():
    text = _result().summary()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "never harvested" in text


def test_summary_several_vms_and_cycles():
    """Two VMs x two cycles, the fd reused: rows name cycle and VM (5, 5#1), within 80."""
    res = _result()
    res.vms, res.vm_cycles, res.reset_eintr, res.interrupt_resets = 2, 2, 3, True
    res.migrate_ms = 5.0
    res.rings = [RingTruth(index=0, vm_fd=fd, vm_gen=cycle, cycle=cycle,
                            pages_written=123456789, harvested=123456789, run_ns=10**9,
                            left_dirty=1 if fd == 9 else 0)
                 for cycle in (0, 1) for fd in (5, 9)]
    text = res.summary()
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = [line.split()[:3] for line in text.splitlines() if line[:2] in (" 0", " 1")]
    assert rows == [["0", "5", "0"], ["0", "9", "0"], ["1", "5#1", "0"], ["1", "9#1", "0"]]
    assert "2 VMs x 2 vCPU(s), 2 cycles" in text
    assert "3 reset(s) cut short by a signal" in text
    assert "2 ring(s) stuck" in text


def test_dump_names_vm_of_each_ring():
    res = _result()
    res.rings[1].vm_fd, res.rings[1].vm_gen = 6, 0
    dump = res.harvest_dump()
    assert dump["vm_fd"] is None
    assert [(r["pid"], r["vm"], r["index"]) for r in dump["rings"]] == [(1, 5, 0), (1, 6, 1)]


def _harvested_ring(k: FakeKernel, pushes: int) -> MappedRing:
    for off in range(pushes):
        k.push(0, off)
    ring = MappedRing(k.buf, k.entries)
    assert len(ring.harvest()) == pushes
    return ring


def test_reset_read_back_whole_range():
    k = FakeKernel(8)
    ring = _harvested_ring(k, 5)
    assert reset_run(ring, 0) == 5
    assert k.reset(0) == 5
    assert ring_reset(ring, 0, 5) == RingReset(5, False)
    assert ring_reset(ring, 5, 0) == RingReset(0, False)
    assert reset_run(ring, 5) == 0


def test_reset_read_back_cut_by_signal():
    """The kernel cleared 2 of 5 harvested entries, then saw the signal: 3 stay RESET."""
    k = FakeKernel(8)
    ring = _harvested_ring(k, 5)
    for i in range(2):
        struct.pack_into("<I", k.buf, 16 * i, 0)
    assert ring_reset(ring, 0, 5) == RingReset(2, True)
    assert reset_run(ring, 2) == 3


def test_reset_read_back_overwritten_before_reset():
    """A push landed on the oldest harvested entry before the reset: the kernel's walk
    ends there (not a signal), nothing of this ring was reset."""
    k = FakeKernel(4)
    ring = _harvested_ring(k, 4)
    k.push(0, 99)  # dirty_index 4 -> slot 0, on top of a RESET entry
    assert ring_reset(ring, 0, 4) == RingReset(0, False)
    assert reset_run(ring, 0) == 0


def test_reset_read_back_repushed_after_reset():
    k = FakeKernel(4)
    ring = _harvested_ring(k, 4)
    assert k.reset(0) == 4
    k.push(0, 99)
    assert ring_reset(ring, 0, 4) == RingReset(4, False)


def test_stuck_ring_has_an_empty_run():
    """300 pushes into 256 entries, one harvest of 256, one reset: the kernel's reset index
    (256) points at slot 0, cleared although entries 256..299 were pushed: nothing more
    can ever be reset there, and no retry is due."""
    k = FakeKernel(256)
    for page in range(300):
        k.push(0, page)
    ring = MappedRing(k.buf, 256)
    assert len(ring.harvest()) == 256
    assert k.reset(0) == 256
    k.push(0, 300)
    assert ring.harvest() == [] and reset_run(ring, 256) == 0
    assert ring_reset(ring, 256, 0) == RingReset(0, False)


def test_attribute_reset_cut_in_second_ring():
    """vCPU order: ring 0 done (tracepoint), ring 1 cut after 1 entry, ring 2 not
    visited: 2 rings' worth of tracepoints is only 1."""
    kernels = [FakeKernel(8) for _ in range(3)]
    rings = [_harvested_ring(k, 3) for k in kernels]
    assert kernels[0].reset(0) == 3
    struct.pack_into("<I", kernels[1].buf, 0, 0)
    out = attribute_reset([(r, 0, 3) for r in rings])
    assert out == CallOutcome([3, 1, 0], 1, 1) and out.total == 4


def test_flags_range_wraps():
    k = FakeKernel(4)
    ring = _harvested_ring(k, 3)
    k.push(0, 7)
    assert ring.flags_range(2, 4) == [RESET, DIRTY, RESET, RESET]
    with pytest.raises(ValueError):
        ring.flags_range(0, 5)


def test_reset_run_limit():
    k = FakeKernel(8)
    ring = _harvested_ring(k, 5)
    assert reset_run(ring, 0, 3) == 3 and reset_run(ring, 0, 0) == 0
    assert reset_run(ring, 0, 100) == 5
