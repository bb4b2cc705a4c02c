"""The live event stream: the probes' per-CPU event rings read in bulk.

:class:`LiveEvents` is the EventSource of ``kvmtrace record``: it loads the probes in mode
``record`` (event output) and yields every ``struct kt_event`` the kernel side produced, in
batches copied straight from the mmap'ed rings, one per CPU, merged in time order and,
within a ring, in index order (:mod:`kvmtrace.bpf.percpu`; no per-event Python). Events a
CPU's ring had no room for are counted there, per CPU, and reported by
:attr:`LiveEvents.lost` and :meth:`LiveEvents.lost_per_buffer`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np

from ..core.sources import EventSource, SourceMeta
from .loader import Probes
from .percpu import RING_PAGES

__all__ = ["LiveEvents"]


class LiveEvents(EventSource):
    """EventSource over freshly loaded probes; ``stop()`` (any thread or a signal handler)
    ends :meth:`batches` after it has drained what the kernel already produced.

    ``batches()`` also yields empty arrays about every ``poll_ms`` while idle, so that a
    consumer can flush files and check deadlines. ``fast_push=False`` is for benchmarks
    only (Probes' test-only override: a push's VM fd from the per-thread hash map).
    ``follow``: ``pid`` and the processes it forks (``-- COMMAND``; Probes' ``follow``).
    """

    def __init__(self, *, pid: int = 0, ringbuf_pages: int = RING_PAGES, hook: str = "auto",
                 poll_ms: int = 20, fast_push: bool = True, follow: bool = False) -> None:
        # Nothing wakes the reader (a wakeup per event, or per n events, costs the vCPUs a
        # CPU): it reads every poll_ms, at once again after a read that found a ring 1/8
        # full (RING_PAGES: how much a ring holds).
        self.probes = Probes("record", pid=pid, hook=hook, ringbuf_pages=ringbuf_pages,
                             fast_push=fast_push, follow=follow)
        try:
            self.reader = self.probes.event_reader()
        except BaseException:
            self.probes.close()
            raise
        uname = os.uname()
        self.meta = SourceMeta(
            kind="live",
            kernel_release=uname.release,
            host=socket.gethostname(),
            start_time=time.time(),
            hooks=dict(self.probes.hooks),
            tracepoint_formats=self.probes.tracepoint_formats(),
            extra={"pid_filter": pid, "follow_children": self.probes.follow,
                   "ringbuf_pages": ringbuf_pages, "ringbufs": self.probes.nr_buffers,
                   "clock": "CLOCK_MONOTONIC", "start_monotonic_ns":
                   time.clock_gettime_ns(time.CLOCK_MONOTONIC)},
        )
        self.poll_ms = poll_ms
        self._stop = threading.Event()

    @property
    def lost(self) -> int:
        return self.probes.lost()

    def lost_per_buffer(self) -> list[int]:
        """Lost events of each CPU's ring (index = CPU)."""
        return self.probes.lost_per_buffer()

    def stop(self) -> None:
        self._stop.set()

    def batches(self) -> Iterator[np.ndarray]:
        while not self._stop.is_set():
            self.reader.wait(self.poll_ms)
            yield self.reader.read()
        # drain: what the kernel produced before stop(). The probes stay attached, so a busy
        # VM keeps adding events: a few reads, not until the rings are empty.
        for _ in range(3):
            batch = self.reader.read(final=True)
            if not len(batch):
                return
            yield batch

    def close(self) -> None:
        self.reader.close()
        self.probes.close()

    def __enter__(self) -> LiveEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
