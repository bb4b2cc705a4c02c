"""Harvesting logic on a fake ring in memory, config validation and result formatting."""

from __future__ import annotations

import json
import struct

import pytest

from kvmtrace.errors import UsageError
from kvmtrace.vmm.kvm import KVM_DIRTY_GFN_F_DIRTY as DIRTY
from kvmtrace.vmm.kvm import KVM_DIRTY_GFN_F_RESET as RESET
from kvmtrace.vmm.result import RingResult, WorkloadResult
from kvmtrace.vmm.vm import DirtyRing, check_ring_bytes
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
    ring = DirtyRing(k.buf, 8)
    assert ring.harvest() == [(0, 0x100), (0, 0x101), (0, 0x102)]
    assert ring.fetch == 3
    assert [k.flags(i) for i in range(4)] == [RESET, RESET, RESET, 0]
    assert ring.harvest() == []
    assert ring.fetch == 3


def test_harvest_reads_slot_and_64bit_offset():
    k = FakeKernel(4)
    k.push(7, 0x1_2345_6789)
    assert DirtyRing(k.buf, 4).harvest() == [(7, 0x1_2345_6789)]


def test_fetch_index_wraps():
    k = FakeKernel(4)
    ring = DirtyRing(k.buf, 4)
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
    ring = DirtyRing(k.buf, 8)
    assert len(ring.harvest(limit=3)) == 3
    assert ring.harvest() == [(0, off) for off in range(3, 8)]
    assert ring.harvest() == []


def test_overflow_loses_the_overwritten_entries():
    """300 pushes into 256 slots: harvesting finds the 256 newest, pages 0..43 are gone."""
    k = FakeKernel(256)
    for page in range(300):
        k.push(0, page)
    got = DirtyRing(k.buf, 256).harvest()
    assert len(got) == 256
    assert {off for _, off in got} == set(range(44, 300))


def test_ring_rejects_bad_sizes():
    with pytest.raises(ValueError):
        DirtyRing(bytearray(16 * 6), 6)
    with pytest.raises(ValueError):
        DirtyRing(bytearray(16), 4)


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
])
def test_config_rejects(kwargs):
    with pytest.raises(UsageError):
        WorkloadConfig(**kwargs).validate()


def _result() -> WorkloadResult:
    rings = [RingResult(index=0, pages_written=10, harvested=9, distinct=9, lost_suspected=1,
                        entries_reset=9, run_ns=1_000_000),
             RingResult(index=1, pages_written=10, harvested=10, distinct=10,
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
