"""The vectorised Replay (kvmtrace.analysis.replay) against the plain ReferenceReplay
(kvmtrace.testing.reference) on random streams (seeded), split into batches at every
position; the working set and hottest pages against plain Python; the harvest digest.
No kernel needed."""

from __future__ import annotations

import numpy as np
import pytest

from kvmtrace.analysis.replay import Replay, ReplayReport
from kvmtrace.core.events import Kind
from kvmtrace.core.sources import SourceMeta
from kvmtrace.model.results import AnomalyKind
from kvmtrace.testing.reference import ReferenceReplay, ReferenceResult
from kvmtrace.testing.synth import SynthVm, bulk_stream

A = AnomalyKind
PID, VM = 1000, 7


def pages(n: int, base: int = 0x100) -> list[tuple[int, int]]:
    return [(1, base + k) for k in range(n)]


# -- the vectorised replay against the reference ------------------------------------------
def random_stream(seed: int) -> np.ndarray:
    """A VM driven at random: runs with and without exits (overflow, no-exit), partial
    harvests, livelock-like re-entries, then events dropped, duplicated or reordered."""
    rng = np.random.default_rng(seed)
    entries = int(rng.choice([256, 512]))
    vm = SynthVm(entries, vcpus=int(rng.integers(1, 4)), pid=PID, vm=VM)
    if rng.random() < 0.7:
        vm.ring_size_event()
    for _ in range(int(rng.integers(3, 12))):
        v = int(rng.integers(0, len(vm.rings)))
        n = int(rng.integers(1, entries + 100))
        offs = rng.integers(0, 400, n).tolist()
        vm.run(v, [(int(rng.integers(0, 2)), o) for o in offs],
               exit_every=int(rng.choice([0, 1, 1, 4])))
        if rng.random() < 0.3:
            vm.enter(v)
        if rng.random() < 0.5:
            lim = None if rng.random() < 0.5 else int(rng.integers(0, entries))
            vm.harvest(limit=lim)
            vm.reset()
        if rng.random() < 0.2:
            vm.stall(v, int(rng.integers(0, 10**6)))
        if rng.random() < 0.1:  # a reset event whose reset_index passed dirty_index
            d = vm.rings[v].dirty_index
            vm._emit(Kind.RESET, v, d, d + int(rng.integers(1, 5)))
    ev = vm.events()
    if rng.random() < 0.5 and len(ev) > 10:  # lose a few events
        ev = np.delete(ev, rng.choice(len(ev), int(rng.integers(1, 6)), replace=False))
    if rng.random() < 0.2 and len(ev) > 10:  # an index going back
        i = int(rng.integers(1, len(ev)))
        ev = np.insert(ev, i, ev[i // 2])
        ev["ts"] = np.sort(ev["ts"])
    return ev


def assert_agree(fast: ReplayReport, ref: ReferenceResult) -> None:
    assert [r.compare_key() for r in fast.rings] == [r.compare_key() for r in ref.rings.values()]
    assert [a.key() for a in fast.anomalies] == [a.key() for a in ref.anomalies]
    assert fast.harvested is not None
    assert {k: sorted(v) for k, v in fast.harvested.items()} == ref.harvested


def reference(ev: np.ndarray, meta: SourceMeta | None = None) -> ReferenceResult:
    rr = ReferenceReplay(meta)
    rr.feed(ev)
    return rr.finish()


@pytest.mark.parametrize("seed", range(40))
def test_fast_replay_agrees_with_reference_on_random_streams(seed: int):
    ev = random_stream(seed)
    ref = reference(ev)
    rng = np.random.default_rng(1000 + seed)
    cuts = np.sort(rng.choice(np.arange(1, len(ev)), min(8, len(ev) - 1), replace=False))
    for batches in ([ev], np.split(ev, cuts)):
        rp = Replay(keep_harvest=True)
        for b in batches:
            rp.feed(b)
        assert_agree(rp.finish(), ref)


@pytest.mark.parametrize("seed", [3, 11, 17])
def test_fast_replay_agrees_at_every_batch_boundary(seed: int):
    ev = random_stream(seed)[:700]
    ref = reference(ev)
    for k in range(1, len(ev)):
        rp = Replay(keep_harvest=True)
        rp.feed(ev[:k])
        rp.feed(ev[k:])
        assert_agree(rp.finish(), ref)


def test_fast_replay_agrees_on_overflow_at_every_boundary():
    vm = SynthVm(256, pid=PID, vm=VM)
    vm.ring_size_event()
    vm.run(0, pages(300), exit_every=0)
    vm.harvest()
    vm.reset()
    vm.run(0, pages(250, 0x800), exit_every=1)
    ev = vm.events()
    ref = reference(ev)
    # after the overflow the harvest ran into the next lap: reset_index sits on a cleared
    # entry, the VMM finds nothing to harvest (livelock) and the ring ends stuck
    assert [a.kind for a in ref.anomalies] == [A.NO_EXIT, A.OVERFLOW, A.LIVELOCK, A.STUCK]
    for k in range(1, len(ev)):
        rp = Replay(keep_harvest=True)
        rp.feed(ev[:k])
        rp.feed(ev[k:])
        assert_agree(rp.finish(), ref)


def test_fast_replay_agrees_on_a_bulk_stream_with_meta_size():
    ev = bulk_stream(6, rings=3, entries=512)
    meta = SourceMeta(kind="x", ring_entries={(PID, VM): 512})
    ref = reference(ev, meta)
    rp = Replay(meta, keep_harvest=True)
    for b in np.array_split(ev, 13):
        rp.feed(b)
    rep = rp.finish()
    assert_agree(rep, ref)
    assert rep.anomalies == []
    assert [r.pushes for r in rep.rings] == [6 * 448] * 3


# -- working set and hottest pages against plain Python ----------------------------------
@pytest.mark.parametrize("seed, max_pages", [(1, 1 << 24), (2, 1 << 24), (3, 300)])
def test_working_set_and_hottest_match_plain_python(seed: int, max_pages: int):
    from collections import Counter

    from kvmtrace.analysis.replay.workingset import WorkingSet

    rng = np.random.default_rng(seed)
    window = 1000
    n = 5000
    ts = np.sort(rng.integers(0, 20 * window, n)).astype(np.uint64) + np.uint64(7)
    ring = rng.integers(0, 3, n)
    slot = rng.choice([0, 1, 5], n).astype(np.uint32)
    off = rng.integers(0, 500, n).astype(np.uint64)
    ws = WorkingSet(window, max_pages=max_pages)
    cuts = np.sort(rng.choice(np.arange(1, n), 9, replace=False))
    for part in np.split(np.arange(n), cuts):
        for r in range(3):
            sel = part[ring[part] == r]
            ws.add((PID, VM, r), ts[sel], slot[sel], off[sel])
    ws.finish()
    t0 = ws.t0  # the first push it was given (ring 0's first of the first batch)
    assert t0 == int(ts[np.flatnonzero(ring == 0)[0]])
    for r in range(3):
        sel = np.flatnonzero(ring == r)
        want: dict[int, tuple[int, set]] = {}
        for i in sel:
            w = (int(ts[i]) - t0) // window
            p, pages_ = want.get(w, (0, set()))
            pages_.add((int(slot[i]), int(off[i])))
            want[w] = (p + 1, pages_)
        got = ws.rings[(PID, VM, r)].windows
        assert got == [(w, p, len(s)) for w, (p, s) in sorted(want.items())]
        assert ws.rings[(PID, VM, r)].pushes == len(sel)
    counts = Counter(zip(slot.tolist(), off.tolist(), strict=True))
    want_hot = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    got_hot = ws.hottest(10)[(PID, VM)]
    assert [((h.slot, h.offset), h.pushes) for h in got_hot] == want_hot


@pytest.mark.parametrize("seed", [5, 6])
def test_fast_replay_agrees_with_several_vms_and_far_apart_rings(seed: int):
    a, b = random_stream(seed), random_stream(seed + 100)
    b["pid"], b["vm"] = PID + 1, VM + 1
    c = random_stream(seed + 200)
    c["ring"] = np.where(c["ring"] >= 0, c["ring"] * 70, c["ring"])  # rings 0, 70, 140
    for mix in (np.concatenate([a, b]), c):
        mix = mix[np.argsort(mix["ts"], kind="stable")]
        ref = reference(mix)
        for parts in (1, 7):
            rp = Replay(keep_harvest=True)
            for part in np.array_split(mix, parts):
                rp.feed(part)
            assert_agree(rp.finish(), ref)


def test_harvest_digest_numpy_equals_scalar_and_ignores_order():
    from kvmtrace.model.digest import MultisetDigest

    rng = np.random.default_rng(9)
    for slots in (np.full(500, 3, np.uint32), rng.integers(0, 1 << 17, 500).astype(np.uint32)):
        offs = rng.integers(0, 1 << 40, 500).astype(np.uint64)
        one = MultisetDigest()
        for s, o in zip(slots.tolist(), offs.tolist(), strict=True):
            one.add(s, o)
        bulk = MultisetDigest()
        perm = rng.permutation(500)
        for part in np.array_split(perm, 3):
            bulk.add_np(slots[part], offs[part])
        assert (bulk.count, bulk.sum1, bulk.sum2) == (one.count, one.sum1, one.sum2)
        assert bulk.hexdigest() == one.hexdigest()
        other = MultisetDigest()
        other.add_np(slots[:-1], offs[:-1])
        other.add(int(slots[-1]), int(offs[-1]) + 1)
        assert other.hexdigest() != one.hexdigest()


# -- causal order: resets racing with the vCPU's pushes ------------------------------------
def racy_stream(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(causal stream, the same as a trace shows it): vCPUs push while a reaper harvests
    and resets at random moments; then each reset is moved in the trace from 3 pushes
    before its push (its dirty_index read before that push's event) to 10 after, and
    timestamps are reassigned in trace order, partly to equal microseconds."""
    rng = np.random.default_rng(seed)
    vm = SynthVm(256, vcpus=2, pid=PID, vm=VM)
    vm.ring_size_event()
    for _ in range(int(rng.integers(200, 1200))):
        v = int(rng.integers(0, 2))
        vm.push(v, 1, int(rng.integers(0, 300)))
        if rng.random() < 0.02:
            vm.enter(v)
        if rng.random() < 0.03:
            vm.harvest(limit=None if rng.random() < 0.7 else int(rng.integers(0, 50)))
            vm.reset()
        if rng.random() < 0.01:
            vm.stall(v, int(rng.integers(0, 10**5)))
    vm.harvest()
    vm.reset()
    causal = vm.events()
    rows = list(range(len(causal)))
    kind, ring = causal["kind"], causal["ring"]
    for i in np.flatnonzero(kind == Kind.RESET).tolist():
        at = rows.index(i)
        delta = int(rng.integers(-3, 11))
        step = 1 if delta > 0 else -1
        j = at
        for _ in range(abs(delta)):
            k = j + step
            if not 0 <= k < len(rows):
                break
            o = rows[k]
            if kind[o] == Kind.RING_SIZE or (kind[o] == Kind.RESET and ring[o] == ring[i]):
                break
            j = k
        rows.insert(j, rows.pop(at))
    trace = causal[rows].copy()
    ts = np.sort(causal["ts"])
    if seed % 2:  # microsecond text: equal timestamps
        ts = ts // 3000 * 3000
    trace["ts"] = ts
    causal = causal.copy()
    causal["ts"] = trace["ts"][np.argsort(rows)]
    return causal, trace


@pytest.mark.parametrize("seed", range(24))
def test_causal_order_undoes_the_race(seed: int):
    causal, trace = racy_stream(seed)
    want = reference(causal)
    assert want.anomalies == []
    got = reference(trace)
    assert got.anomalies == []
    for a, b in zip(got.rings.values(), want.rings.values(), strict=True):
        assert (a.pushes, a.resets, a.entries_reset, a.soft_full_exits, a.max_used,
                a.harvested, a.harvest_sum1, a.overwritten) == (
            b.pushes, b.resets, b.entries_reset, b.soft_full_exits, b.max_used,
            b.harvested, b.harvest_sum1, b.overwritten)
    assert got.harvested == want.harvested
    rng = np.random.default_rng(seed)
    for parts in (1, 3, 17):
        cuts = np.sort(rng.choice(np.arange(1, len(trace)), parts - 1, replace=False))
        rp = Replay(keep_harvest=True)
        for b in np.split(trace, cuts):
            rp.feed(b)
        assert_agree(rp.finish(), got)
