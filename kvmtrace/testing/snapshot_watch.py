"""Live snapshots under churn: a :mod:`~kvmtrace.testing.vm_cycles` child (cycles of
concurrent built-in VMs, fds reused) run under :class:`~kvmtrace.bpf.loader.Probes`
filtered on its pid while a thread takes snapshots all the while, and the laws those
snapshots obey against the VMs' own ground truth: a ring's cumulative pushes never go back,
never pass what the VMM wrote, and end equal to it. Shared by tests/test_top_slots_kvm.py
and tools/soak_top.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from ..bpf.loader import Probes
from ..core.counters import Snapshot
from .held import attach, release

__all__ = ["FD_BITS", "plan", "start_cycles", "watch_cycles", "pushes_by_ring",
           "pushes_written", "snapshot_mismatch"]

_CHECKOUT = Path(__file__).resolve().parents[2]  # where ``-m kvmtrace...`` imports from
FD_BITS = 20  # vm = fd | gen << 20: the fd is the low 20 bits of a ring key's vm


def plan(vms: int, vcpus: int, cycles: int, pages: int = 300) -> list[list[dict[str, Any]]]:
    """``cycles`` cycles of ``vms`` VMs of ``vcpus`` vCPUs, 256-entry rings, an exit every
    page (no overflow): ``pages`` pages written once per vCPU."""
    cfg = {"vcpus": vcpus, "ring_bytes": 4096, "pages": pages, "exit_every": 1}
    return [[dict(cfg) for _ in range(vms)] for _ in range(cycles)]


def start_cycles(cycles: list[list[dict[str, Any]]]) -> subprocess.Popen[bytes]:
    """The vm_cycles child of ``cycles``, held until one byte arrives on its stdin
    (:func:`kvmtrace.testing.held.release`)."""
    return subprocess.Popen([sys.executable, "-m", "kvmtrace.testing.vm_cycles",
                             json.dumps(cycles)], cwd=_CHECKOUT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)


def watch_cycles(cycles: list[list[dict[str, Any]]], **options: Any
                 ) -> tuple[list[dict[str, Any]], list[Snapshot], Probes]:
    """Run ``cycles`` in one child under ``Probes(pid=child, **options)``, snapshotting all
    the while: (the VMs' ground truths, every snapshot taken, the probes still open: the
    caller closes them)."""
    child = start_cycles(cycles)
    probes = attach(child, lambda: Probes(pid=child.pid, **options))
    snaps: list[Snapshot] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            snaps.append(probes.snapshot())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        truths = release(child)
    except BaseException:
        probes.close()
        raise
    finally:
        done.set()
        watcher.join()
    snaps.append(probes.snapshot())
    return truths, snaps, probes


def pushes_by_ring(snap: Snapshot) -> Counter[tuple[int, int, int]]:
    """Cumulative pushes per (pid, VM fd, ring index) of one snapshot."""
    got: Counter[tuple[int, int, int]] = Counter()
    for key, c in snap.rings.items():
        if key.ring >= 0:
            got[(key.pid, key.vm & ((1 << FD_BITS) - 1), key.ring)] += c.pushes
    return got


def pushes_written(truths: list[dict[str, Any]]) -> Counter[tuple[int, int, int]]:
    """The VMM's pages written per (pid, VM fd, ring index): the pushes to expect."""
    want: Counter[tuple[int, int, int]] = Counter()
    for t in truths:
        for r in t["rings"]:
            want[(t["pid"], t["vm_fd"], r["index"])] += r["pages_written"]
    return want


def snapshot_mismatch(truths: list[dict[str, Any]], snaps: list[Snapshot]) -> str | None:
    """None when every snapshot's pushes per ring are at least the previous one's and at
    most the VMM's, and the last equals the VMM's; else what went wrong first."""
    want = pushes_written(truths)
    prev: Counter[tuple[int, int, int]] = Counter()
    for snap in snaps:
        cur = pushes_by_ring(snap)
        back = {k: (n, cur[k]) for k, n in prev.items() if cur[k] < n}
        if back:
            return f"pushes went back: {sorted(back.items())[:3]}"
        over = {k: (n, want[k]) for k, n in cur.items() if n > want[k]}
        if over:
            return f"more pushes than written: {sorted(over.items())[:3]}"
        prev = cur
    if prev != want:
        return f"final pushes differ: {sorted((want - prev).items())[:3]}"
    return None
