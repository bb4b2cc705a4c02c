"""The push program's fast path (array slots by ring address) against its hash-map path.

Both sets of probes are attached at once to the same VMM, so they see the same pushes: the
snapshots (top) or the events (record) must agree field by field, and the pushes must equal
the workload's ground truth.
The VMM runs several VMs one after the other in one process, so new vCPUs (and their rings)
are likely to reuse the memory and the VM fd of freed ones: the case where a slot's owner
must be checked again. Each VM under the reused fd is a new gen (vm = fd | gen << 20).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from conftest import ROOT

from kvmtrace.bpf.loader import Probes, add_push_slots, live_used_counts
from kvmtrace.core.events import Kind
from kvmtrace.core.kvm_abi import vm_id
from kvmtrace.testing.held import attach, release

pytestmark = pytest.mark.kernel

SEQUENTIAL_VMS = """
import json, sys
from kvmtrace.vmm.workload import WorkloadConfig, run_workload
sys.stdin.buffer.read(1)
out = []
for cfg in json.loads(sys.argv[1]):
    out.append(run_workload(WorkloadConfig(**cfg)).to_dict())
print(json.dumps(out))
"""

RUNS = [
    {"vcpus": 2, "ring_bytes": 4096, "pages": 1000, "exit_every": 1},
    {"vcpus": 2, "ring_bytes": 4096, "pages": 1000, "exit_every": 1, "pattern": "random"},
    {"vcpus": 3, "ring_bytes": 8192, "pages": 700, "exit_every": 3},
    {"vcpus": 1, "ring_bytes": 4096, "pages": 300, "exit_every": 0},  # may overflow
]

# All exact here: a ring's max_used is its soft limit (reached at a soft-full exit, where
# its vCPU waits for the harvest) or is read at the final reset, after the vCPUs stopped.
# (With a reaper, a reset reads dirty_index while the vCPU pushes: two programs may see
# different used values.)
FIELDS = ("pushes", "resets", "entries_reset", "soft_full_exits", "dirty_index",
          "reset_index", "max_used", "lost", "size")


@contextmanager
def fast_and_hash(**options: Any) -> Iterator[tuple[Probes, Probes, list[dict]]]:
    """Run RUNS in one child process under two sets of probes attached at once, with and
    without the fast path: (fast, hash, the runs' ground truths), the probes still open."""
    child = subprocess.Popen([sys.executable, "-c", SEQUENTIAL_VMS, json.dumps(RUNS)],
                             cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    fast, slow = attach(child, lambda: (
        Probes(pid=child.pid, hook="raw_tp", **options),
        Probes(pid=child.pid, hook="raw_tp", fast_push=False, **options)))
    with fast, slow:
        assert fast.fast_push and not slow.fast_push
        truths = release(child)
        yield fast, slow, truths


def test_fast_and_hash_paths_agree_on_sequential_vms(kvm, bpf_root) -> None:
    with fast_and_hash() as (fast, slow, truths):
        got_fast, got_slow = fast.snapshot(), slow.snapshot()
        slots = fast.push_slots()
        keys, vals = fast.read_map("rings")
        gens = {(int(k["pid"]), int(k["vm"]), int(k["ring"])): int(v["gen"])
                for k, v in zip(keys, vals, strict=True)}
    want: Counter[tuple[int, int, int]] = Counter()
    for gen, t in enumerate(truths):  # one VM fd, reused: gens 0, 1, ...
        assert not t["livelock"] and t["vm_fd"] == truths[0]["vm_fd"]
        for r in t["rings"]:
            want[(t["pid"], vm_id(t["vm_fd"], gen), r["index"])] += r["pages_written"]
    rows = {k: c for k, c in got_fast.rings.items() if k.ring >= 0}
    assert {tuple(k): c.pushes for k, c in rows.items()} == dict(want)
    assert rows.keys() == {k for k in got_slow.rings if k.ring >= 0}
    for key, c in rows.items():
        s = got_slow.rings[key]
        assert [getattr(c, f) for f in FIELDS] == [getattr(s, f) for f in FIELDS], key
    # the fast path did the counting: the last VM's ring took one push on the hash-map
    # path (the claim), the rest in its slot; its row is its own (a new VM under the reused
    # fd is a new key), so the row never saw another ring (gen 0)
    last = truths[-1]
    key = (last["pid"], vm_id(last["vm_fd"], len(truths) - 1), 0)
    mine = [s for s in slots if tuple(s["key"].tolist()) == key]
    assert gens[key] == 0
    assert [int(s["pushes"]) for s in mine] == [last["rings"][0]["pages_written"] - 1]
    assert got_fast.lost_events == got_slow.lost_events == 0


def _row(**kw: int) -> dict:
    row = {"pushes": 0, "resets": 0, "dirty_index": 0, "reset_index": 0, "reset_base": 0,
           "reset_dirty": 0, "max_used": 0, "overwritten": 0, "gen": 0}
    row.update(kw)
    return row


def test_slots_fold_into_their_rows() -> None:
    from kvmtrace.bpf.layout import PUSH_SLOT_DTYPE
    from kvmtrace.core.counters import RingKey

    rows = {RingKey(7, 5, 0): _row(pushes=1, dirty_index=11, reset_index=10),
            RingKey(7, 5, 1): _row(pushes=3, dirty_index=0xFFFF_FFFE),
            RingKey(7, 6, 0): _row(pushes=5, dirty_index=5, gen=1)}
    slots = np.zeros(4, PUSH_SLOT_DTYPE)
    slots[0] = (0x1000, 50, 1, 11, (7, 5, 0), 0, 0)  # 50 pushes after index 11
    slots[1] = (0x2000, 4, 1, 0xFFFF_FFFE, (7, 5, 1), 0, 0)  # wraps to 2
    slots[2] = (0x3000, 9, 1, 0, (8, 5, 0), 0, 0)  # a row that is gone: ignored
    slots[3] = (0x4000, 99, 1, 1, (7, 6, 0), 0, 0)  # an earlier ring under the key: pushes only
    add_push_slots(rows, slots)
    assert (rows[RingKey(7, 5, 0)]["pushes"], rows[RingKey(7, 5, 0)]["dirty_index"]) == (51, 61)
    assert (rows[RingKey(7, 5, 1)]["pushes"], rows[RingKey(7, 5, 1)]["dirty_index"]) == (7, 2)
    assert (rows[RingKey(7, 6, 0)]["pushes"], rows[RingKey(7, 6, 0)]["dirty_index"]) == (104, 5)


def test_live_used_counts_between_resets() -> None:
    # last reset: reset_index 100, dirty 150 then; now dirty 420 with 256 entries: pushes
    # 357..420 were made with used > 256, i.e. 64 entries overwritten since that reset
    row = _row(dirty_index=420, reset_index=100, reset_base=100, reset_dirty=150,
               max_used=200, overwritten=5)
    assert live_used_counts(row, 256) == (320, 5 + 64)
    assert live_used_counts(row, None) == (320, 5)  # size unknown: nothing more to say
    # those up to reset_dirty were counted at the reset already
    row = _row(dirty_index=420, reset_index=100, reset_base=100, reset_dirty=400,
               max_used=300)
    assert live_used_counts(row, 256) == (320, 20)
    row = _row(dirty_index=300, reset_index=280, reset_base=280, reset_dirty=290,
               max_used=192)
    assert live_used_counts(row, 256) == (192, 0)


def test_record_takes_the_same_vm_from_slots(kvm, bpf_root) -> None:
    """Event output: the VM fd of a push from its ring's slot (fast) or from the per-thread
    map (hash): both sets of probes, attached at once, emit the same events (but for their
    time stamps and measured durations)."""
    with fast_and_hash(mode="record", ringbuf_pages=1024) as (
            fast, slow, truths):
        got = [p.poll_events() for p in (fast, slow)]
        assert fast.lost() == slow.lost() == 0
    fields = ["kind", "pid", "tid", "vm", "ring", "dirty_index", "reset_index", "slot",
              "value"]
    for e in got:
        # stall and reset-latency durations: each program reads its own clock
        e["value"][np.isin(e["kind"], (Kind.STALL, Kind.RESET_LAT))] = 0
        # a push or exit reads its ring's reset_index, a reset its dirty_index: another
        # thread (a reset, another vCPU's harvest) may move them between the two reads
        e["reset_index"][np.isin(e["kind"], (Kind.PUSH, Kind.EXIT))] = 0
        e["dirty_index"][e["kind"] == Kind.RESET] = 0
    ev_fast, ev_slow = (Counter(map(tuple, e[fields].tolist())) for e in got)
    assert ev_fast == ev_slow
    pushes: Counter[tuple[int, int]] = Counter()
    for e, n in ev_fast.items():
        if e[0] == Kind.PUSH:
            pushes[(e[3], e[4])] += n
    want: Counter[tuple[int, int]] = Counter()
    for gen, t in enumerate(truths):
        for r in t["rings"]:
            want[(vm_id(t["vm_fd"], gen), r["index"])] += r["pages_written"]
    assert pushes == want
