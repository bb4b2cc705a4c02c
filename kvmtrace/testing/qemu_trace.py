"""QEMU's own trace events (``-trace NAME -D FILE -msg timestamp=on``, the ``log``
backend of Debian's build) as ground truth for what QEMU did with its dirty rings.

Each line is ``TID@SECONDS.MICROS:EVENT ARGS`` (the writing thread's id, the realtime
clock). The events (QEMU 7.2 accel/kvm/trace-events, migration/trace-events):

- ``migration_bitmap_sync_start`` / ``migration_bitmap_sync_end``: one migration sync
  (``dirty-sync-count`` goes up by one in it), in the migration thread;
- ``kvm_dirty_ring_reap reaped N pages (took U us)``: one reap of the rings, by any thread;
  QEMU issues ``KVM_RESET_DIRTY_RINGS`` after it only when N > 0;
- ``kvm_dirty_ring_full vcpu I``: vCPU I's thread got ``KVM_EXIT_DIRTY_RING_FULL``;
- ``kvm_dirty_ring_reaper wait|wakeup|init``: the reaper thread;
- ``dirtylimit_vcpu_execute CPU[I] sleep U us``: under ``set-vcpu-dirty-limit``, vCPU I's
  thread sleeps U us after a soft-full exit's reap (the sleep a signal may cut short).

:func:`trace_args` gives the command-line arguments; :func:`read_trace` parses the file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TRACE_EVENTS", "trace_args", "QemuSync", "QemuTrace", "read_trace"]

TRACE_EVENTS = ("migration_bitmap_sync_start", "migration_bitmap_sync_end",
                "kvm_dirty_ring_reap", "kvm_dirty_ring_full", "kvm_dirty_ring_reaper",
                "dirtylimit_vcpu_execute")
_LINE = re.compile(r"^(\d+)@\d+\.\d+:(\w+) ?(.*)$")
_REAPED = re.compile(r"reaped (\d+) pages")
_SLEEP = re.compile(r"CPU\[(\d+)\] sleep (\d+) us")


def trace_args(log: str | Path) -> list[str]:
    """QEMU arguments that write :data:`TRACE_EVENTS` to ``log`` with thread ids."""
    out = []
    for name in TRACE_EVENTS:
        out += ["-trace", name]
    return out + ["-D", str(log), "-msg", "timestamp=on"]


@dataclass(frozen=True)
class QemuSync:
    """One ``migration_bitmap_sync``: its thread and the entries its reap collected."""

    tid: int
    reaped: int


@dataclass
class QemuTrace:
    syncs: list[QemuSync] = field(default_factory=list)
    #: thread -> entries of each of its reaps outside a sync, in order
    reaps: dict[int, list[int]] = field(default_factory=dict)
    full_exits: Counter[int] = field(default_factory=Counter)  #: vCPU index -> exits
    reaper_tid: int | None = None
    #: vCPU index -> each dirty-limit sleep asked for (us), in order
    throttle_sleeps: dict[int, list[int]] = field(default_factory=dict)
    #: vCPU index -> per soft-full exit, in order: whether QEMU slept after its reap
    exit_slept: dict[int, list[bool]] = field(default_factory=dict)


def read_trace(path: str | Path) -> QemuTrace:
    """Parse QEMU's trace log (lines of other events are skipped)."""
    out = QemuTrace()
    open_sync: dict[int, int] = {}  # tid -> entries reaped so far in its open sync
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        tid, name, args = int(m[1]), m[2], m[3]
        if name == "migration_bitmap_sync_start":
            open_sync[tid] = 0
        elif name == "migration_bitmap_sync_end" and tid in open_sync:
            out.syncs.append(QemuSync(tid, open_sync.pop(tid)))
        elif name == "kvm_dirty_ring_reap":
            n = int(_REAPED.search(args)[1]) if _REAPED.search(args) else 0
            if tid in open_sync:
                open_sync[tid] += n
            else:
                out.reaps.setdefault(tid, []).append(n)
        elif name == "kvm_dirty_ring_full":
            out.full_exits[int(args.split()[-1])] += 1
            out.exit_slept.setdefault(int(args.split()[-1]), []).append(False)
        elif name == "kvm_dirty_ring_reaper":
            out.reaper_tid = tid
        elif name == "dirtylimit_vcpu_execute":
            t = _SLEEP.search(args)
            if t is not None:
                out.throttle_sleeps.setdefault(int(t[1]), []).append(int(t[2]))
                slept = out.exit_slept.get(int(t[1]))
                if slept:
                    slept[-1] = True
    return out
