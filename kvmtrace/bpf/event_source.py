"""The live event stream: the probes' BPF ring buffer read in bulk.

:class:`LiveEvents` is the EventSource of ``kvmtrace record``: it loads the probes in mode
``record`` (event output) and yields every ``struct kt_event`` the kernel side
produced, in batches read straight from the mmap'ed ring buffer (no per-event Python).
Events the BPF side could not reserve in the ring are counted there, per CPU, and reported
by :attr:`LiveEvents.lost`.
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np

from ..core.events import EVENT_DTYPE
from ..core.sources import EventSource, SourceMeta
from .loader import Probes
from .ringbuf import RingBufReader

__all__ = ["LiveEvents"]


class LiveEvents(EventSource):
    """EventSource over freshly loaded probes; ``stop()`` (any thread or a signal handler)
    ends :meth:`batches` after it has drained what the kernel already produced.

    ``batches()`` also yields empty arrays about every ``poll_ms`` while idle, so that a
    consumer can flush files and check deadlines. ``fast_push=False`` is for benchmarks
    only (Probes' test-only override: a push's VM fd from the per-thread hash map).
    ``follow``: ``pid`` and the processes it forks (``-- COMMAND``; Probes' ``follow``).
    """

    def __init__(self, *, pid: int = 0, ringbuf_pages: int = 4096, hook: str = "auto",
                 poll_ms: int = 100, fast_push: bool = True, follow: bool = False) -> None:
        # Woken once per wake_every records of each CPU, else read every poll_ms: no wakeup
        # (and reader run) per event, which would compete with the vCPUs for CPUs. With
        # every CPU's share at most 1/8 of the ring, the reader is woken at least once per
        # 1/8 of the ring however many CPUs produce.
        records = ringbuf_pages * mmap.PAGESIZE // (EVENT_DTYPE.itemsize + 8)
        wake_every = max(1, records // 8 // (os.cpu_count() or 1))
        self.probes = Probes("record", pid=pid, hook=hook,
                             ringbuf_pages=ringbuf_pages, wake_every=wake_every,
                             fast_push=fast_push, follow=follow)
        # edge-triggered: a level-triggered wait returns while any record is in the ring, so
        # the loop would wake for every few records (median 10 per read was measured)
        self.reader = RingBufReader(self.probes.ringbuf_fd(), edge=True)
        uname = os.uname()
        self.meta = SourceMeta(
            kind="live",
            kernel_release=uname.release,
            host=socket.gethostname(),
            start_time=time.time(),
            hooks=dict(self.probes.hooks),
            tracepoint_formats=self.probes.tracepoint_formats(),
            extra={"pid_filter": pid, "follow_children": self.probes.follow,
                   "ringbuf_pages": ringbuf_pages,
                   "clock": "CLOCK_MONOTONIC", "start_monotonic_ns":
                   time.clock_gettime_ns(time.CLOCK_MONOTONIC)},
        )
        self.poll_ms = poll_ms
        self._stop = threading.Event()

    @property
    def lost(self) -> int:
        return self.probes.lost()

    def stop(self) -> None:
        self._stop.set()

    def batches(self) -> Iterator[np.ndarray]:
        while not self._stop.is_set():
            self.reader.wait(self.poll_ms)
            yield self.reader.read()
        while True:  # drain: whatever the kernel produced before stop()
            batch = self.reader.read()
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
