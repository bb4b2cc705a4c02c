"""Heartbeat lines of a running workload (``kvmtrace workload --progress-ms MS``).

Every MS milliseconds one newline-delimited JSON object goes to stderr, so a benchmark can
measure the guest's dirtying rate over any window of a long run without stopping a vCPU:

    {"progress": 1, "t_ns": ..., "rings": [{"vm": 0, "index": 0, "harvested": ...,
     "cpu_ns": ...}, ...]}

``t_ns`` is CLOCK_MONOTONIC in ns; ``harvested`` the entries this VMM has taken out of the
ring so far (its own count: each guest write dirties one entry on these kernels, so it
trails the guest's writes by at most one harvest period); ``cpu_ns`` the vCPU thread's
run time from ``/proc/self/task/TID/schedstat`` (ns on CPU, guest and host time alike;
0 before the thread started or after it ended).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["PROGRESS_SCHEMA", "Heartbeat", "thread_run_ns"]

PROGRESS_SCHEMA = 1  #: the value of "progress" in each line


def thread_run_ns(tid: int) -> int:
    """Time thread ``tid`` of this process has spent on a CPU, ns (schedstat field 1);
    0 when the thread is not (or no longer) there."""
    if not tid:
        return 0
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


class Heartbeat:
    """Print a progress line every ``period_s`` until ``done`` is set, then one last line.

    ``rings`` returns (vm number, ring index, harvested, vCPU thread id) for each ring
    now; it is read without the harvester's lock (ints, each read whole)."""

    def __init__(self, period_s: float,
                 rings: Callable[[], list[tuple[int, int, int, int]]],
                 out: TextIO | None = None) -> None:
        self.period_s = period_s
        self.rings = rings
        self.out = out if out is not None else sys.stderr

    def line(self) -> dict[str, Any]:
        return {"progress": PROGRESS_SCHEMA, "t_ns": time.monotonic_ns(),
                "rings": [{"vm": vm, "index": index, "harvested": harvested,
                           "cpu_ns": thread_run_ns(tid)}
                          for vm, index, harvested, tid in self.rings()]}

    def main(self, done: threading.Event) -> None:
        while True:
            stop = done.wait(self.period_s)
            try:
                self.out.write(json.dumps(self.line(), separators=(",", ":")) + "\n")
                self.out.flush()
            except (OSError, ValueError):  # the reader went away: the run goes on
                return
            if stop:
                return
