"""The record probes' event output, one ring per CPU, read as one stream.

In mode ``record`` each event goes to the ring of the CPU its program runs on: records
``c * entries ..`` of map ``cpu_events`` (struct kt_event) for CPU c, with its counters in
element c of map ``cpu_heads`` (struct kt_cpu_head; dirty_ring.bpf.c kt_emit()). Only CPU
c's programs write CPU c's ring, so a record costs no lock, no atomic and no cache line
shared with another CPU's writers, and the reader is never woken: it polls.
:class:`PerCpuReader` maps both arrays (BPF_F_MMAPABLE, Linux 5.5: older than the dirty
ring itself, 5.11) and hands what each ring holds, in place, to :class:`EventMerge`, which
copies the records out of the rings once (then the reader moves the tails) and puts the
events back into one stream:

- **Time.** Events go by ``ts`` (``bpf_ktime_get_ns()``, CLOCK_MONOTONIC), a stable sort:
  one buffer's events keep their order among equal times. A buffer (a CPU's ring) holds
  one CPU's events in the order they were written, and a thread's events move to another
  buffer only when it migrates.
- **Completeness.** A read takes the time T before it reads any buffer. An event stamped
  before T may still be published after its buffer was read (its program took ``ts``, then
  wrote the record and moved ``head``), so only events stamped up to T - ``slack_ns`` are
  handed on; later ones wait for the next read. A ring whose CPU was writing a record as it
  was read (``busy``) lowers that limit to the last time read from it. A *final* read
  hands on everything (the producers are done). ``late`` counts events read after every
  event up to their time had been handed on (0 unless a program took longer than the slack
  between its ``ts`` and publishing its record).
- **Index order within a ring** (docs/FORMAT.md, "Causal order of a ring's events": pushes
  of a ring keep their trace order, and so do its resets). Clocks of two CPUs may disagree,
  so where one ring's pushes (or its resets) came through more than one buffer in a merge,
  they are put in index order among the places they took: pushes by ``dirty_index``,
  resets by ``reset_index`` then ``dirty_index`` (u32 serial arithmetic; both indices only
  move forward). ``reordered`` counts the events this moved. A ring seen in one buffer only
  (its vCPU thread stayed on one CPU) is left as it came; which rings were seen in several
  is found exactly from the starts of runs of one ring in a buffer (:func:`shared_rings`),
  and a ring already in index order is not moved (:func:`ring_order`).
"""

from __future__ import annotations

import mmap
import platform
import time
from collections.abc import Sequence
from types import TracebackType

import numpy as np

from ..core.events import EVENT_DTYPE, Kind, concat_records, copy_records, take_records
from ..errors import KvmtraceError, MissingFeature, UsageError
from .layout import CPU_HEAD_DTYPE

__all__ = ["HEAD_BYTES", "RING_PAGES", "SLACK_NS", "EventMerge", "PerCpuReader", "ring_entries",
           "ring_order", "shared_rings"]

#: how long after its ``ts`` an event is taken to be committed. A program reserves within
#: microseconds of reading the clock (it cannot move to another CPU meanwhile), so a
#: thread's next event, on whichever CPU, is stamped after its previous one is in its
#: buffer: any slack above the CPUs' clock skew keeps a ring's events in order. A host
#: that stops a virtual CPU between the two only makes that event late (``late``): out of
#: time order with other threads' events, never out of its ring's order. Events held
#: back are merged again at the next read: a small slack keeps that work small.
SLACK_NS = 2_000_000

_PUSH, _RESET = np.uint8(Kind.PUSH), np.uint8(Kind.RESET)
#: u64 words of struct kt_event holding pid, ring, vm and kind (and tid, slot, padding)
_KEY_U64 = sorted({EVENT_DTYPE.fields[f][1] // 8 for f in ("pid", "ring", "vm", "kind")})


def _ring_keys(ev: np.ndarray) -> np.ndarray:
    """Each event's (pid, vm, ring, kind) as one int64, equal for equal fields: packed
    where every field fits (pid < 2^22, kind < 8, ring + 1 < 2^12, vm + 1 < 2^26: fd
    and generation of any real VMM), else numbered after a sort of all four."""
    pid = ev["pid"].astype(np.int64)
    vm = ev["vm"].astype(np.int64) + 1
    ring = ev["ring"].astype(np.int64) + 1
    kind = ev["kind"].astype(np.int64)
    if (pid.max() < 1 << 22 and kind.max() < 1 << 3 and ring.min() >= 0
            and ring.max() < 1 << 12 and vm.min() >= 0 and vm.max() < 1 << 26):
        return pid | kind << 22 | ring << 25 | vm << 37
    order = np.lexsort((kind, ring, vm, pid))
    new = np.zeros(len(ev), bool)
    for col in (pid, vm, ring, kind):
        c = col[order]
        new[1:] |= c[1:] != c[:-1]
    key = np.empty(len(ev), np.int64)
    key[order] = np.cumsum(new)
    return key


def _run_heads(ev: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Where a run of one (pid, vm, ring, kind) and one source starts, and maybe more
    places (a run cut in two changes nothing): compared as the u64 words of struct
    kt_event that hold those fields (with tid, slot and padding beside them), in place
    (gathering the fields first costs several times more)."""
    n = len(ev)
    head = np.empty(n, bool)
    head[0] = True
    words = (ev if ev.flags.c_contiguous else copy_records(ev)).view(np.uint64).reshape(n, -1)
    h = head[1:]
    np.not_equal(src[1:], src[:-1], out=h)
    for w in _KEY_U64:
        col = words[:, w]
        h |= col[1:] != col[:-1]
    return np.flatnonzero(head)


def shared_rings(ev: np.ndarray, src: np.ndarray) -> np.ndarray | None:
    """Each event's number (-1: none) among the rings whose pushes (or whose resets) occur
    in more than one source (``src``: each event's); None when no ring's do. Found from
    the runs of one ring and source (a buffer's events come in long runs: a vCPU thread
    pushes many in a row), so the work per event is a few vector operations."""
    if src.min() == src.max():
        return None
    at = _run_heads(ev, src)
    kind = ev["kind"][at]
    ordered = (kind == _PUSH) | (kind == _RESET)
    if not ordered.any():
        return None
    sel = at[ordered]
    # rings (sorted by key) and the sources of their runs: numpy's unique() costs tens of
    # microseconds a call, a sort of these few hundred keys a few
    key = _ring_keys(take_records(ev, sel))
    by_key = np.argsort(key, kind="stable")
    sk, ss = key[by_key], src[sel][by_key]
    first = np.empty(len(sk), bool)
    first[0] = True
    np.not_equal(sk[1:], sk[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    shared = np.minimum.reduceat(ss, starts) != np.maximum.reduceat(ss, starts)
    if not shared.any():
        return None
    number = np.where(shared, np.cumsum(shared) - 1, -1).astype(np.int32)
    which = np.empty(len(sk), np.intp)
    which[by_key] = np.cumsum(first) - 1
    run_id = np.full(len(at), -1, np.int32)
    run_id[ordered] = number[which]
    return np.repeat(run_id, np.diff(np.append(at, len(ev))))


def ring_order(ev: np.ndarray, ring_id: np.ndarray, src: np.ndarray | None = None) -> int:
    """Put, in place, the events of each ring numbered in ``ring_id`` (-1: leave alone;
    :func:`shared_rings`) in index order among their positions in ``ev``: pushes by
    ``dirty_index``, resets by ``reset_index`` then ``dirty_index`` (u32 serial
    arithmetic), ties in their order in ``ev``; ``src`` (per event) moves with them.
    Returns how many events moved."""
    pos = np.flatnonzero(ring_id >= 0)
    if not len(pos):
        return 0
    gid = ring_id[pos]
    order = np.argsort(gid.astype(np.uint16) if gid.max() < 1 << 16 else gid, kind="stable")
    g = gid[order]
    start = np.ones(len(order), bool)
    start[1:] = g[1:] != g[:-1]
    at = pos[order]
    di, ri, kind = ev["dirty_index"][at], ev["reset_index"][at], ev["kind"][at]
    ddi = (di[1:] - di[:-1]).astype(np.int32)
    dri = (ri[1:] - ri[:-1]).astype(np.int32)
    ok = np.where(kind[1:] == _PUSH, ddi > 0, (dri > 0) | ((dri == 0) & (ddi >= 0)))
    if np.all(ok | start[1:]):  # the common case: every ring already in index order
        return 0
    group = np.cumsum(start) - 1
    first = np.flatnonzero(start)[group]  # each event's ring's first event
    rel_di = (di - di[first]).astype(np.int32)
    rel_ri = (ri - ri[first]).astype(np.int32)
    rel_ri[kind == _PUSH] = 0
    by_index = np.lexsort((rel_di, rel_ri, group))  # stable: ties keep their order
    moved = int(np.count_nonzero(by_index != np.arange(len(order))))
    ev[at] = take_records(ev, at[by_index])
    if src is not None:
        src[at] = src[at[by_index]]
    return moved


class EventMerge:
    """Merges per-buffer batches into one stream (time, completeness and index rules of
    the module docstring); keeps the events not yet complete between calls."""

    def __init__(self, dtype: np.dtype = EVENT_DTYPE) -> None:
        self.dtype = np.dtype(dtype)
        self._held = np.empty(0, self.dtype)
        self._held_src = np.empty(0, np.int32)
        self._done: int | None = None  # every event stamped up to this was handed on
        #: events read after every event up to their time had been handed on
        self.late = 0
        self.reordered = 0  #: events moved by the index rule

    @property
    def held(self) -> int:
        """Events waiting for a later call."""
        return len(self._held)

    def merge(self, parts: Sequence[np.ndarray], limit: int | None,
              sources: Sequence[int] | None = None) -> np.ndarray:
        """The events of ``parts`` (arrays in their buffer's order; ``sources``: each
        part's buffer, default its index, so that a ring read in two pieces is one
        source) and of earlier calls that are complete: stamped up to ``limit`` ns (None:
        all), in merged order. The result and what is held are copies: ``parts`` may be
        the rings' own memory, written over once the call returns."""
        srcs = range(len(parts)) if sources is None else sources
        live = [(p, s) for p, s in zip(parts, srcs, strict=True) if len(p)]
        nheld = len(self._held)
        if not live and not nheld:
            return np.empty(0, self.dtype)
        ring_id = None
        if not live:  # only events held: already a private copy, in merged order
            ev, src = self._held, self._held_src
            ts = ev["ts"]
            order = None if np.all(ts[1:] >= ts[:-1]) else np.argsort(ts, kind="stable")
        else:
            arrays = [p for p, _ in live]
            if nheld:
                arrays.insert(0, self._held)
            # one pass over the parts (the rings' memory): everything after reads the copy
            ev = concat_records(arrays) if len(arrays) > 1 else copy_records(arrays[0])
            src = np.empty(len(ev), np.int32)
            src[:nheld] = self._held_src
            at = nheld
            for p, s in live:
                src[at : at + len(p)] = s
                at += len(p)
            ts = np.ascontiguousarray(ev["ts"])
            if self._done is not None:  # stamped at or before a time already handed on
                new = ts[nheld:]
                done = np.uint64(self._done)
                if new.min() <= done:
                    self.late += int(np.count_nonzero(new <= done))
            if len(arrays) == 1:
                order = None if np.all(ts[1:] >= ts[:-1]) else np.argsort(ts, kind="stable")
            else:
                order = np.argsort(ts, kind="stable")
                ring_id = shared_rings(ev, src)
        if order is not None:
            ev, src, ts = take_records(ev, order), src[order], ts[order]
            ring_id = None if ring_id is None else ring_id[order]
        cut = len(ev) if limit is None else int(np.searchsorted(ts, np.uint64(max(0, limit)),
                                                                "right"))
        done = int(ts[-1]) if limit is None else limit  # before ring_order() moves events
        if ring_id is not None:
            self.reordered += ring_order(ev, ring_id, src)
        self._held, self._held_src = copy_records(ev[cut:]), src[cut:].copy()
        self._done = done if self._done is None else max(self._done, done)
        return ev[:cut]


HEAD_BYTES = CPU_HEAD_DTYPE.itemsize
# u64 indices of struct kt_cpu_head's fields within an element
_HEAD, _BUSY, _TAIL = (CPU_HEAD_DTYPE.fields[f][1] // 8 for f in ("head", "busy", "tail"))


#: default pages of one CPU's ring (record --ringbuf-pages): 4 MiB, 65536 events, about
#: 0.25 s of the highest push rate seen on one CPU here
RING_PAGES = 1024


def ring_entries(pages: int) -> int:
    """Records of one CPU's ring for ``pages`` pages per CPU: the largest power of two
    whose records (struct kt_event, 48 bytes) fit (--ringbuf-pages)."""
    fit = max(1, pages * mmap.PAGESIZE // EVENT_DTYPE.itemsize)
    return 1 << (fit.bit_length() - 1)


def _mmap(fd: int, size: int) -> mmap.mmap:
    size = (size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
    return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


class PerCpuReader:
    """Reads the per-CPU rings (``heads_fd``: map ``cpu_heads``, ``events_fd``: map
    ``cpu_events``; ``ncpus`` rings of ``entries`` records) as one stream of ``dtype``
    records (:class:`EventMerge`). Nothing wakes it: ``wait()`` sleeps until the next poll,
    or not at all when the last read found a ring more than 1/8 full. Counters:
    ``records`` (read), ``late``, ``reordered`` (the merge's), ``max_fill`` (the largest
    share of a ring one read found filled).

    Memory ordering: the program writes a record, then ``head``; the reader reads ``head``,
    copies the records, then writes ``tail``. On x86-64 (TSO) loads are not reordered with
    other loads, nor stores with earlier loads, so that pairs as acquire/release would;
    other architectures would need barriers Python cannot emit, and are refused."""

    def __init__(self, heads_fd: int, events_fd: int, ncpus: int, entries: int,
                 dtype: np.dtype = EVENT_DTYPE, *, slack_ns: int = SLACK_NS) -> None:
        if platform.machine() != "x86_64":
            raise MissingFeature("the per-CPU event rings are read relying on x86-64 memory "
                                 "ordering", "record on an x86-64 host")
        if entries < 1 or entries & (entries - 1):
            raise UsageError(f"ring entries must be a power of two, not {entries}",
                             "see ring_entries()")
        self.dtype = np.dtype(dtype)
        self.ncpus, self.entries = ncpus, entries
        self._hm = _mmap(heads_fd, ncpus * HEAD_BYTES)
        try:
            self._em = _mmap(events_fd, ncpus * entries * self.dtype.itemsize)
        except BaseException:
            self._hm.close()
            raise
        self._heads = np.frombuffer(self._hm, np.uint64, count=ncpus * HEAD_BYTES // 8
                                    ).reshape(ncpus, HEAD_BYTES // 8)
        self._events = np.frombuffer(self._em, self.dtype, count=ncpus * entries
                                     ).reshape(ncpus, entries)
        self.slack_ns = slack_ns
        self.merger = EventMerge(self.dtype)
        self._last_ts = [0] * ncpus
        self.records = 0
        self.max_fill = 0.0
        self._hurry = False

    def _views(self, cpu: int) -> tuple[list[np.ndarray], bool, int]:
        """CPU ``cpu``'s new records, as views of its ring (one piece, or two where they
        wrap), whether its CPU was writing one, and the head to set its tail to once they
        are copied."""
        row = self._heads[cpu]
        head = int(row[_HEAD])  # first: the records below it are complete
        busy = bool(row[_BUSY])
        tail = int(row[_TAIL])
        n = head - tail
        if n <= 0:
            return [], busy, tail
        if n > self.entries:  # the program never moves head past tail + entries
            raise KvmtraceError(f"CPU {cpu}'s event ring is damaged (head {head}, tail {tail})")
        mask = self.entries - 1
        a, b = tail & mask, head & mask
        ring = self._events[cpu]
        self.records += n
        self.max_fill = max(self.max_fill, n / self.entries)
        return ([ring[a:b]] if a < b else [ring[a:], ring[:b]][: 2 if b else 1]), busy, head

    def read_cpu(self, cpu: int) -> tuple[np.ndarray, bool]:
        """CPU ``cpu``'s new records alone, copied, not merged (a check of one ring), and
        whether its CPU was writing one."""
        views, busy, head = self._views(cpu)
        part = concat_records(views) if views else copy_records(self._events[cpu, :0])
        self._heads[cpu, _TAIL] = head  # last: the program may now write over these records
        return part, busy

    def read(self, *, final: bool = False) -> np.ndarray:
        """The complete events now in the rings (and held from earlier reads), merged;
        ``final``: every event read, complete or not (the producers are done)."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        limit: int | None = None if final else now - self.slack_ns
        parts: list[np.ndarray] = []
        sources: list[int] = []
        heads = []
        fullest = 0
        for cpu in range(self.ncpus):
            views, busy, head = self._views(cpu)
            heads.append(head)
            if views:
                parts += views
                sources += [cpu] * len(views)
                fullest = max(fullest, sum(len(v) for v in views))
                self._last_ts[cpu] = max(int(v["ts"].max()) for v in views)
            if limit is not None and busy:  # a record being written
                limit = min(limit, self._last_ts[cpu])
        self._hurry = fullest > self.entries / 8
        out = self.merger.merge(parts, limit, sources)  # copies the records out of the rings
        self._heads[:, _TAIL] = heads  # last: the programs may now write over them
        return out

    def pending(self) -> int:
        """Records in the rings not read yet, summed."""
        h = self._heads
        return int(np.sum(h[:, _HEAD].astype(np.int64) - h[:, _TAIL].astype(np.int64)))

    def wait(self, timeout_ms: int) -> None:
        """Sleep timeout_ms before the next read, or not at all when the last read found a
        ring more than 1/8 full (a burst: read again at once)."""
        if not self._hurry and timeout_ms > 0:
            time.sleep(timeout_ms / 1000)

    @property
    def late(self) -> int:
        return self.merger.late

    @property
    def reordered(self) -> int:
        return self.merger.reordered

    def close(self) -> None:
        if self._hm.closed:
            return
        del self._heads, self._events
        self._hm.close()
        self._em.close()

    def __enter__(self) -> PerCpuReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
