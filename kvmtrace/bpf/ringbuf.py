"""Bulk reader of a BPF ring buffer (``BPF_MAP_TYPE_RINGBUF``), many records per call.

bcc's ``ring_buffer_poll()`` calls back into Python once per record (about 1-2 M records/s
here). :class:`RingBufReader` instead maps the ring itself and decodes every complete record
available in one numpy pass.

Layout of the map's mmap (kernel/bpf/ringbuf.c), ``P`` = page size, ``S`` = ring bytes
(``max_entries``, a power-of-two multiple of ``P``):

- offset 0, one page, read-write: ``consumer_pos`` (u64 at byte 0), the only page user space
  may write;
- offset ``P``, read-only: ``producer_pos`` (u64 at byte 0), then from offset ``2P`` the
  ``S`` data bytes mapped twice in a row, so that ``[pos & (S-1), +len)`` never wraps.

Each record starts 8-byte aligned with an 8-byte header ``{u32 len; u32 pg_off}``; ``len`` has
``BUSY_BIT`` (1 << 31) while the producer has reserved but not yet committed it and
``DISCARD_BIT`` (1 << 30) when it was discarded. A record takes ``round_up(len + 8, 8)``
bytes. ``consumer_pos`` and ``producer_pos`` are free-running byte counters.

Memory ordering: on x86-64 (TSO) loads are not reordered with other loads and stores not
with earlier loads, so reading ``producer_pos``, then the headers, then the payloads, and
storing ``consumer_pos`` last gives the acquire/release pairing libbpf uses. Other
architectures would need real barriers, which Python cannot emit: the reader refuses them.
"""

from __future__ import annotations

import errno
import mmap
import os
import platform
import select
from types import TracebackType

import numpy as np

from ..core.events import EVENT_DTYPE
from ..errors import MissingFeature, UsageError
from ..host.bpf_syscall import MAP_TYPE_RINGBUF, map_info

__all__ = [
    "BUSY_BIT",
    "DISCARD_BIT",
    "HEADER_BYTES",
    "RingBufReader",
    "decode_records",
]

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_BYTES = 8  # struct bpf_ringbuf_hdr {u32 len; u32 pg_off}


def _record_dtype(dtype: np.dtype) -> np.dtype:
    size = (HEADER_BYTES + dtype.itemsize + 7) & ~7
    return np.dtype({"names": ["len", "ev"], "formats": ["<u4", dtype],
                     "offsets": [0, HEADER_BYTES], "itemsize": size})


def decode_records(
    data: np.ndarray, cons: int, prod: int, mask: int, dtype: np.dtype = EVENT_DTYPE,
    limit: int | None = None,
) -> tuple[np.ndarray, int, int, int]:
    """Decode the committed records in ``[cons, prod)`` of a ring's data bytes.

    ``data`` is a uint8 view of the data area mapped twice (length 2 * (mask + 1)).
    Records whose payload is not ``dtype.itemsize`` bytes are skipped and counted.
    Returns (events copied out of the ring, new consumer position, records discarded by
    the producer, foreign-sized records skipped). Stops at the first BUSY record, or once
    ``limit`` records (kept or discarded) have been consumed.
    """
    size = dtype.itemsize
    rec = _record_dtype(dtype)
    out: list[np.ndarray] = []
    discarded = foreign = taken = 0
    limit = limit if limit is not None and limit > 0 else 1 << 62
    while cons < prod and taken < limit:
        start = cons & mask
        avail = prod - cons
        n = min(avail // rec.itemsize, limit - taken)
        if n:
            view = data[start : start + n * rec.itemsize].view(rec)
            lens = view["len"]
            bad = np.flatnonzero((lens & ~np.uint32(DISCARD_BIT)) != size)
            good = int(bad[0]) if bad.size else n
            if good:
                dropped = (lens[:good] & np.uint32(DISCARD_BIT)) != 0
                nd = int(np.count_nonzero(dropped))
                # payloads as opaque fixed-size items: numpy copies those ~10x faster
                # than a structured dtype with fields
                evs = np.ndarray((good,), np.dtype((np.void, size)), data,
                                 start + HEADER_BYTES, (rec.itemsize,))
                out.append((evs[~dropped] if nd else evs.copy()).view(dtype))
                discarded += nd
                taken += good
                cons += good * rec.itemsize
                continue
        if avail < HEADER_BYTES:
            break
        hdr = int(data[start : start + 4].view("<u4")[0])
        if hdr & BUSY_BIT:
            break
        length = hdr & ~(BUSY_BIT | DISCARD_BIT)
        total = (length + HEADER_BYTES + 7) & ~7
        if total > avail:
            break
        taken += 1
        if hdr & DISCARD_BIT:
            discarded += 1
        elif length == size:
            out.append(data[start + HEADER_BYTES : start + HEADER_BYTES + size].view(dtype).copy())
        else:
            foreign += 1
        cons += total
    if not out:
        return np.empty(0, dtype), cons, discarded, foreign
    events = out[0] if len(out) == 1 else np.concatenate(out)
    return events, cons, discarded, foreign


class RingBufReader:
    """Reads records of ``dtype`` from a BPF ringbuf map fd in bulk.

    ``read()`` returns every complete record available as one numpy array (a copy, safe to
    keep) and frees their space in the ring. ``wait(timeout_ms)`` blocks in epoll until the
    kernel signals data. Counters: ``records``, ``discarded``, ``foreign`` (records of
    another size, skipped). Single consumer only, like the kernel's own contract.

    ``edge=False``: ``wait()`` returns as soon as the ring holds any data (the map's poll is
    level-triggered: ``ringbuf_map_poll`` reports EPOLLIN while producer_pos !=
    consumer_pos). A consumer looping ``wait(); read()`` against a busy producer then wakes
    for every few records. ``edge=True`` (EPOLLET): ``wait()`` returns only when the
    producer has *woken* the reader since the last ``wait()`` (a submit with
    ``BPF_RB_FORCE_WAKEUP``, or without flags when the reader had caught up), else at the
    timeout; the caller then reads everything that accumulated, in large batches.
    """

    def __init__(self, map_fd: int, dtype: np.dtype = EVENT_DTYPE, *,
                 edge: bool = False) -> None:
        if platform.machine() != "x86_64":
            raise MissingFeature("the bulk ring-buffer reader relies on x86-64 memory ordering",
                                 "use bcc's ring_buffer_poll() on this architecture")
        try:
            info = map_info(map_fd)
        except OSError as err:
            raise UsageError(f"fd {map_fd} is not a BPF map: {os.strerror(err.errno)}") from None
        mtype, size = int(info.type), int(info.max_entries)
        if mtype != MAP_TYPE_RINGBUF:
            raise UsageError(f"BPF map fd {map_fd} has type {mtype}, not a ring buffer (27)")
        self.dtype = np.dtype(dtype)
        self.size = size  # bytes of data, a power of two
        self.records = 0
        self.discarded = 0
        self.foreign = 0
        page = mmap.PAGESIZE
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data_map = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                                   offset=page)
        self._cons = np.frombuffer(self._cons_map, dtype="<u8", count=1)
        self._prod = np.frombuffer(self._data_map, dtype="<u8", count=1)
        self._data = np.frombuffer(self._data_map, dtype=np.uint8, offset=page)
        self._epoll = select.epoll()
        self.edge = edge
        self._epoll.register(map_fd, select.EPOLLIN | (select.EPOLLET if edge else 0))

    def pending_bytes(self) -> int:
        """Bytes between consumer_pos and producer_pos (committed or not)."""
        return int(self._prod[0]) - int(self._cons[0])

    def read(self, max_records: int | None = None) -> np.ndarray:
        """The complete records now in the ring (at most ``max_records``), oldest first;
        advances consumer_pos past them."""
        cons = int(self._cons[0])
        prod = int(self._prod[0])  # x86: a load, ordered before the loads below
        if prod == cons:
            return np.empty(0, self.dtype)
        events, new_cons, discarded, foreign = decode_records(
            self._data, cons, prod, self.size - 1, self.dtype, max_records
        )
        self._cons[0] = new_cons  # x86: a store, after every load above (release)
        self.records += len(events)
        self.discarded += discarded
        self.foreign += foreign
        return events

    def wait(self, timeout_ms: int = -1) -> bool:
        """Block until the ring has data (``edge``: until the producer wakes the reader) or
        timeout_ms passes (-1: forever). True if woken, False at the timeout."""
        try:
            ready = self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1)
        except InterruptedError:
            return False
        except OSError as err:
            if err.errno == errno.EINTR:
                return False
            raise
        return bool(ready)

    def fileno(self) -> int:
        """The epoll fd, for a caller's own select/poll loop."""
        return self._epoll.fileno()

    def close(self) -> None:
        if self._epoll.closed:
            return
        self._epoll.close()
        del self._cons, self._prod, self._data
        self._cons_map.close()
        self._data_map.close()

    def __enter__(self) -> RingBufReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
