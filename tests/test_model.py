"""The ring model (kvmtrace.model.ring) and every anomaly kind of the replay with exact time,
ring and indices. The vectorised Replay against the plain ReferenceReplay:
tests/test_replay_agree.py. No kernel needed."""

from __future__ import annotations

import numpy as np

from kvmtrace.analysis.replay import Replay, ReplayReport
from kvmtrace.core.events import Kind
from kvmtrace.core.kvm_abi import (
    KVM_DIRTY_GFN_F_DIRTY,
    KVM_DIRTY_GFN_F_RESET,
    RESERVES_UNKNOWN,
    infer_size,
    soft_limit_of,
    valid_entries,
)
from kvmtrace.core.sources import SourceMeta
from kvmtrace.model.results import AnomalyKind
from kvmtrace.model.ring import DirtyRing
from kvmtrace.model.sizes import RingSizes
from kvmtrace.testing.synth import SynthVm

A = AnomalyKind
PID, VM = 1000, 7


# -- the ring model ----------------------------------------------------------------------
def test_push_writes_then_increments_dirty_index():
    r = DirtyRing(256, index=3)
    assert (r.size, r.soft_limit, r.dirty_index, r.reset_index, r.used) == (256, 192, 0, 0, 0)
    assert r.push(1, 0x10) is None
    assert (r.dirty_index, r.used) == (1, 1)
    e = r.entries[0]
    assert (e.flags, e.slot, e.offset) == (KVM_DIRTY_GFN_F_DIRTY, 1, 0x10)


def test_soft_limit_is_size_minus_reserve_and_full_at_size():
    assert soft_limit_of(256) == 192 and soft_limit_of(512) == 448
    assert soft_limit_of(4096, 576) == 3520  # Intel PML adds 512 to the reserve
    r = DirtyRing(256)
    for k in range(191):
        r.push(0, k)
    assert not r.soft_full()
    r.push(0, 191)
    assert r.soft_full() and not r.full() and r.used == 192
    for k in range(192, 256):
        r.push(0, k)
    assert r.full() and r.used == 256
    lost = r.push(0, 256)  # the kernel only WARNs: the oldest live entry is overwritten
    assert lost is not None and (lost.slot, lost.offset) == (0, 0)
    assert r.used == 257


def test_reset_collects_consecutive_reset_flagged_entries_from_reset_index():
    r = DirtyRing(256)
    for k in range(10):
        r.push(0, k)
    assert r.reset() == []  # nothing harvested yet: nothing collected
    assert r.harvest(limit=4) == [(0, 0), (0, 1), (0, 2), (0, 3)]
    r.entry_at(6).flags = KVM_DIRTY_GFN_F_RESET  # flagged, but after a gap
    assert r.reset() == [(0, 0), (0, 1), (0, 2), (0, 3)]  # stops at entry 4
    assert (r.reset_index, r.used) == (4, 6)
    assert r.entry_at(0).flags == 0 and r.entry_at(6).flags == KVM_DIRTY_GFN_F_RESET


def test_reset_event_fires_per_ring_also_when_nothing_collected():
    vm = SynthVm(256, vcpus=3, pid=PID, vm=VM)
    vm.push(1, 0, 5)
    vm.harvest()
    collected = vm.reset()
    assert collected == [[], [(0, 5)], []]
    ev = vm.events()
    resets = ev[ev["kind"] == Kind.RESET]
    assert resets["ring"].tolist() == [0, 1, 2]
    assert resets["dirty_index"].tolist() == [0, 1, 0]
    assert resets["reset_index"].tolist() == [0, 1, 0]
    push = ev[ev["kind"] == Kind.PUSH][0]
    assert (int(push["dirty_index"]), int(push["reset_index"])) == (1, 0)  # after ++


def test_infer_size_and_valid_entries():
    assert infer_size(448, 448) == 512  # exit at the soft limit of 512
    assert infer_size(192, 192) == 256
    assert infer_size(300, 300) == 256  # overflowed before exiting: the upper bound
    assert infer_size(10, 10) is None  # too early to be a soft-full exit
    assert [valid_entries(x) for x in (128, 256, 300, 512, 65536, 131072)] == [
        False, True, False, True, True, False]


# -- anomalies, one by one ---------------------------------------------------------------
def replay(ev: np.ndarray, meta: SourceMeta | None = None, **kw: object) -> ReplayReport:
    rp = Replay(meta, **kw)  # type: ignore[arg-type]
    rp.feed(ev)
    return rp.finish()


def push_ts(ev: np.ndarray, dirty_index: int, ring: int = 0) -> int:
    sel = (ev["kind"] == Kind.PUSH) & (ev["dirty_index"] == dirty_index) & (ev["ring"] == ring)
    (i,) = np.flatnonzero(sel)
    return int(ev["ts"][i])


def pages(n: int, base: int = 0x100) -> list[tuple[int, int]]:
    return [(1, base + k) for k in range(n)]


def test_clean_stream_has_no_anomaly():
    vm = SynthVm(256, vcpus=2, pid=PID, vm=VM)
    vm.ring_size_event()
    for _ in range(3):
        vm.run(0, pages(500), exit_every=1)
        vm.run(1, pages(300, 0x1000), exit_every=3)
    vm.harvest()
    vm.reset()
    rep = replay(vm.events())
    assert rep.anomalies == [] and rep.exit_status == 0
    r0, r1 = rep.rings
    assert (r0.pushes, r1.pushes) == (1500, 900)
    assert r0.entries_reset == r0.harvested == 1500 and r1.harvested == 900
    assert r0.size == 256 and r0.size_source == "trace"


def test_overflow_names_exactly_the_overwritten_entries():
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    ps = pages(300)
    vm.run(0, ps, exit_every=0)  # a tight loop: no guest exit, no soft-full exit
    ev = vm.events()
    rep = replay(ev)
    assert [a.kind for a in rep.anomalies] == [A.NO_EXIT, A.OVERFLOW]  # in time order
    ov = next(a for a in rep.anomalies if a.kind is A.OVERFLOW)
    assert ov.ring == (PID, VM, 0)
    assert (ov.time_ns, ov.dirty_index, ov.reset_index) == (push_ts(ev, 257), 257, 0)
    assert ov.count == 44 and ov.entries == ps[:44]
    assert rep.rings[0].overwritten == 44 and rep.rings[0].max_used == 300
    assert "44 unharvested entries overwritten" in ov.detail


def test_pushes_past_soft_limit_then_reset_before_entry_is_clean():
    """The kernel raises KVM_REQ_DIRTY_RING_SOFT_FULL at the push reaching the soft limit
    and drops it at the next guest entry if a reset brought used below the limit
    (kvm_dirty_ring_check_request): pushes past the limit then a reset is no anomaly."""
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, pages(200), exit_every=0)  # 8 pushes past the soft limit 192, no exit
    vm.harvest()
    vm.reset()
    assert replay(vm.events()).anomalies == []


def test_whole_reserve_used_then_reset_is_clean():
    """Even the whole reserve: the ring full (used = size) and a reset before the next
    entry overwrites nothing; only pushes into a full ring are no_exit (with overflow)."""
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, pages(256), exit_every=0)
    vm.harvest()
    vm.reset()
    assert replay(vm.events()).anomalies == []


def test_soft_full_exit_at_the_limit_is_clean():
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, pages(192), exit_every=0)
    assert vm.enter(0)
    vm.harvest()
    vm.reset()
    rep = replay(vm.events())
    assert rep.anomalies == [] and rep.rings[0].soft_full_exits == 1


def test_gap_when_push_events_are_lost():
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, pages(100), exit_every=1)
    ev = vm.events()
    drop = np.flatnonzero((ev["kind"] == Kind.PUSH) & (ev["dirty_index"] >= 50)
                          & (ev["dirty_index"] <= 52))
    ev = np.delete(ev, drop)
    (a,) = replay(ev).anomalies
    assert a.kind is A.GAP and a.ring == (PID, VM, 0)
    assert (a.time_ns, a.dirty_index, a.reset_index, a.count) == (push_ts(ev, 53), 53, 0, 3)
    assert (a.extra["index"], a.extra["expected"], a.extra["got"]) == ("dirty_index", 50, 53)


def test_reset_beyond_dirty_index():
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, pages(10), exit_every=1)
    vm._emit(Kind.RESET, 0, 10, 15)  # the kernel's reset_index passed dirty_index
    ev = vm.events()
    (a,) = replay(ev).anomalies
    assert a.kind is A.RESET_BEYOND
    assert (a.time_ns, a.dirty_index, a.reset_index, a.count) == (int(ev["ts"][-1]), 10, 15, 5)


def test_indices_going_backwards():
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, pages(100), exit_every=1)
    vm._emit(Kind.RESET, 0, 5, 0)  # dirty_index 5, 95 pushes late
    ev = vm.events()
    # causal order moves a reset before at most HOLD_VCPU (64) later pushes: it lands
    # after push 36, where dirty_index 36 -> 5 goes back; the model resyncs to 5, so push
    # 37 is a jump over 31 entries that are still live
    kinds = [x.kind for x in replay(ev).anomalies]
    assert kinds == [A.GAP, A.OVERFLOW, A.BACKWARDS]
    a = replay(ev).anomalies[2]
    assert (a.time_ns, a.dirty_index, a.reset_index, a.count) == (int(ev["ts"][-1]), 5, 0, 31)
    assert (a.extra["index"], a.extra["before"], a.extra["after"]) == ("dirty_index", 36, 5)


def test_livelock_exits_without_reset_progress():
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, pages(192), exit_every=0)
    for _ in range(4):
        assert vm.enter(0)  # the VMM re-enters without harvesting
    ev = vm.events()
    (a,) = replay(ev).anomalies
    exits = ev["ts"][ev["kind"] == Kind.EXIT]
    assert a.kind is A.LIVELOCK and a.ring == (PID, VM, 0)
    assert (a.time_ns, a.dirty_index, a.reset_index, a.count) == (int(exits[1]), 192, 0, 4)
    assert a.extra == {"used": 192}


def test_size_inferred_from_first_soft_full_exit():
    vm = SynthVm(512, pid=PID, vm=VM)
    vm.run(0, pages(1000), exit_every=1)
    rep = replay(vm.events())
    assert (rep.rings[0].size, rep.rings[0].size_source) == (512, "inferred")
    rep = replay(vm.events(), SourceMeta(kind="x", ring_entries={(-1, -1): 1024}))
    assert (rep.rings[0].size, rep.rings[0].size_source) == (1024, "meta")


def test_interrupted_reset_is_no_trace_loss():
    """Since Linux 6.16 KVM_RESET_DIRTY_RINGS stops at a pending signal (-EINTR) part-way
    through a ring's walk and fires no kvm_dirty_ring_reset for it; the VMM retries. Pushes
    then show reset_index moved with no reset event: no gap, unless the recording says the
    kernel is older (its walk could not be interrupted: a reset event was lost)."""
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, pages(100), exit_every=1)
    vm.harvest()
    vm.rings[0].reset()  # the walk ran, the ioctl returned -EINTR: no event
    vm.run(0, pages(10, 0x900), exit_every=1)  # pushes show reset_index 100
    ev = vm.events()
    for release in (None, "6.18.0", "6.16.1"):
        rep = replay(ev, SourceMeta(kind="recording", kernel_release=release))
        assert rep.anomalies == []
        assert (rep.rings[0].entries_reset, rep.rings[0].harvested) == (100, 100)
    (gap,) = replay(ev, SourceMeta(kind="recording", kernel_release="6.1.0")).anomalies
    assert gap.kind is A.GAP and gap.extra["index"] == "reset_index"
    assert (gap.extra["expected"], gap.extra["got"]) == (0, 100)
    vm.reset()  # the retry: its event confirms the advance on any kernel
    rep = replay(vm.events(), SourceMeta(kind="recording", kernel_release="6.1.0"))
    assert rep.anomalies == [] and rep.rings[0].entries_reset == 100


def test_push_reading_reset_index_past_its_own_entry():
    """The push tracepoint reads reset_index after writing its entry: a reset walk that ran
    in between collected that very entry (reset_index = the push's dirty_index). Not a
    reset past dirty_index (seen on a real reaper run)."""
    from kvmtrace.testing.reference import ReferenceReplay

    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, pages(10), exit_every=1)
    r = vm.rings[0]
    r.push(1, 0x500)  # entry 10 written, dirty_index 11; its tracepoint not yet
    r.harvest()
    r.reset()  # the walk collects entries 0..10
    vm._emit(Kind.PUSH, 0, 11, 11, 1, 0x500)
    vm._emit(Kind.RESET, 0, 11, 11)
    ev = vm.events()
    rep = replay(ev)
    assert rep.anomalies == []
    assert (rep.rings[0].entries_reset, rep.rings[0].harvested, rep.rings[0].pushes) == (
        11, 11, 11)
    ref = ReferenceReplay()
    ref.feed(ev)
    want = ref.finish()
    assert [x.compare_key() for x in rep.rings] == [x.compare_key()
                                                    for x in want.rings.values()]


def test_infer_size_reserve_rules():
    # KVM_ENABLE_CAP refuses a ring smaller than the reserve: with PML (576) no ring of
    # 256 or 512 entries exists, the smallest is 1024 (soft limit 448)
    assert infer_size(250, 250, 576) is None
    assert infer_size(448, 448, 576) == 1024
    # reserve unknown (live maps): only an exit exactly at a soft limit one reserve explains
    assert infer_size(192, reserved=RESERVES_UNKNOWN) == 256
    assert infer_size(448, reserved=RESERVES_UNKNOWN) is None


def test_ring_size_policy_precedence():
    meta = SourceMeta(kind="t", ring_entries={(1, -1): 512})
    sizes = RingSizes(meta)
    assert sizes.size(1, 5) == (512, "meta") and sizes.size(2, 5) == (None, "unknown")
    assert sizes.infer(1, 5, 448, 448) is None  # known: no inference
    assert sizes.infer(2, 5, 192, 192) == 256 and sizes.size(2, 5) == (256, "inferred")
    assert sizes.from_event(1, 5, 8192) == 512 and sizes.size(1, 5) == (512, "trace")
    assert sizes.from_event(1, 5, 8192) is None  # no change
    assert sizes.from_event(1, 5, 5000) is None and sizes.size(1, 5) == (512, "trace")
    assert sizes.from_event(2, 5, 4096 * 4) == 1024 and sizes.size(2, 5) == (1024, "trace")
