"""Decoded blocks handed between the worker processes of a replay on every core
(:mod:`.parallel`) through shared memory, without copies through pipes.

Each worker owns an :class:`Arena`: an anonymous ``MAP_SHARED`` mapping made before the
workers fork, so every worker sees every arena at the same bytes. The worker that decodes
a block copies its columns (:class:`~kvmtrace.core.columns.EventColumns`: group table,
group numbers, order, times, the grouped and per-group columns) into its arena once, and
sends the others a short :class:`Layout` (where each array is) through a pipe; they read
the columns in place as read-only numpy views (:meth:`Arena.columns`).

The arena is a ring of bytes filled and freed in block order. A reader tells the writer
how far it is done with the blocks it read through :class:`Done` (a shared array of
block numbers, one per worker): a block's bytes are reused once every other worker is done
with it. :func:`arena_bytes` sizes an arena so that a writer never waits for a reader that
is itself waiting for that writer's next block (see there).
"""

from __future__ import annotations

import mmap
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...core.columns import EventColumns

__all__ = ["ALIGN", "Arena", "Done", "Layout", "Room", "arena_bytes", "block_bytes",
           "parent_alive"]

#: byte alignment of every array in an arena (a cache line)
ALIGN = 64
#: arrays per block at most: table, starts, gid, order, ts, 4 grouped or per-group columns
_ARRAYS = 9
#: bytes per event at most (gid u2, order intp, ts u64, value u64, dirty/reset/slot u32)
_PER_EVENT = 2 + 8 + 8 + 8 + 4 + 4 + 4
#: bytes per group at most (a GROUP_DTYPE row, 20 bytes, its start and 4 per-group columns)
_PER_GROUP = 20 + 8 + 4 * 8 + 8


def block_bytes(n: int, ngroups: int) -> int:
    """Arena bytes one block of ``n`` events in ``ngroups`` groups may take, at most."""
    return n * _PER_EVENT + ngroups * _PER_GROUP + _ARRAYS * ALIGN


def arena_bytes(blocks: list[tuple[int, int]], window_events: int, ahead: int,
                spans: list[int] | None = None) -> int:
    """Size of an arena for blocks of these (events, groups): room for any run of blocks
    that spans ``window_events`` events (what a replay may still hold, not yet done:
    :data:`.colfeed.COLUMN_BATCH` and one block), one more block and the bytes a ring
    wastes at its end (the largest block each), and ``ahead`` more (what a writer decodes
    ahead of its readers). ``spans``: per block, the events of the stream from it to the
    arena's next block (its own and the other arenas' blocks between: what a replay
    holds with it); default its own events.

    Without the ``ahead`` blocks this is the least that never deadlocks: a writer waiting
    for room to decode block b waits for readers (itself too) that hold blocks before b
    only, within their window; the one among them furthest behind waits for block b at
    most, never for a later one."""
    if not blocks:
        return ALIGN
    sizes = [block_bytes(n, g) for n, g in blocks]
    counts = [n for n, _ in blocks] if spans is None else spans
    most = 0  # the most bytes of consecutive blocks within the window (two pointers)
    lo = run_b = run_n = 0
    for hi in range(len(sizes)):
        run_b += sizes[hi]
        run_n += counts[hi]
        # own events: all but the run's first within the window; spans: all but its
        # last's (those are within the stream's run a replay holds)
        while run_n - counts[lo if spans is None else hi] >= window_events and lo < hi:
            run_b -= sizes[lo]
            run_n -= counts[lo]
            lo += 1
        most = max(most, run_b)
    big = max(sizes)
    return most + (ahead + 2) * big


@dataclass(frozen=True)
class Layout:
    """Where one block's arrays are in an arena: (name, dtype, count, byte offset) each;
    names ``table``, ``gid``, ``order``, ``ts``, ``g:<column>`` (grouped) and
    ``c:<column>`` (per group)."""

    block: int
    n: int
    arrays: tuple[tuple[str, np.dtype, int, int], ...]
    start: int
    end: int


class Done:
    """Per worker, the block number before which it is done reading other workers'
    arenas (a shared i64 array, made before the fork)."""

    def __init__(self, workers: int) -> None:
        self._map = mmap.mmap(-1, 8 * workers)
        self.at = np.frombuffer(self._map, np.int64)

    def set(self, worker: int, block: int) -> None:
        self.at[worker] = block

    def least(self) -> int:
        """The lowest mark."""
        return int(self.at.min())


class Arena:
    """One worker's ring of shared bytes (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.size = max(ALIGN, -(-size // ALIGN) * ALIGN)
        self._map = mmap.mmap(-1, self.size)  # anonymous: MAP_SHARED, kept over fork
        self.bytes = np.frombuffer(self._map, np.uint8)
        self.head = 0
        self.live: deque[tuple[int, int, int]] = deque()  # (block, start, end) in use

    def _place(self, nbytes: int) -> int | None:
        """The offset where ``nbytes`` fit now, or None."""
        if nbytes > self.size:
            raise ValueError(f"a block of {nbytes} bytes exceeds the arena ({self.size})")
        if not self.live:
            self.head = 0
            return 0
        tail = self.live[0][1]
        if self.head >= tail:  # free: [head, size) and [0, tail)
            if self.head + nbytes <= self.size:
                return self.head
            return 0 if nbytes < tail else None
        return self.head if self.head + nbytes < tail else None

    def free(self, before: int) -> None:
        """Blocks numbered below ``before`` are no longer read by anyone."""
        while self.live and self.live[0][0] < before:
            self.live.popleft()

    def reserve(self, block: int, nbytes: int, done: Done,
                alive: Callable[[], None]) -> Room:
        """Room for a block of at most ``nbytes`` (:func:`block_bytes`), waiting until every
        worker (this one too) is done with the blocks in the way; ``alive()`` raises if a
        worker it waits for is gone."""
        self.free(done.least())
        at = self._place(nbytes)
        while at is None:
            alive()
            time.sleep(0.0002)
            self.free(done.least())
            at = self._place(nbytes)
        return Room(self, block, at, at + nbytes)

    def commit(self, room: Room, parts: EventColumns,
               starts: np.ndarray | None = None) -> Layout:
        """The block decoded into ``room`` (arrays from :meth:`Room.alloc` stay where they
        are, the others are copied in), with its groups' ``starts`` when given: where its
        arrays are."""
        arrays: list[tuple[str, np.ndarray]] = [("table", parts.groups), ("ts", parts.ts)]
        if starts is not None:
            arrays.append(("starts", starts))
        if parts.gid is not None:
            arrays.append(("gid", parts.gid))
        if parts.order is not None:
            arrays.append(("order", parts.order))
        arrays += [(f"g:{k}", v) for k, v in parts.grouped.items()]
        arrays += [(f"c:{k}", v) for k, v in parts.const.items()]
        base = self.bytes.ctypes.data
        out = []
        for name, a in arrays:
            pos = a.ctypes.data - base
            if not (room.at <= pos < room.pos and a.flags.c_contiguous):
                a = np.ascontiguousarray(a)
                pos = room.take(a.nbytes)
                self.bytes[pos:pos + a.nbytes] = a.view(np.uint8).reshape(-1)
            out.append((name, a.dtype, len(a), pos))
        self.head = room.pos
        self.live.append((room.block, room.at, room.pos))
        return Layout(room.block, parts.n, tuple(out), room.at, room.pos)

    def columns(self, lay: Layout) -> tuple[EventColumns, np.ndarray | None]:
        """The block at ``lay`` as read-only views of this arena, and its groups' starts
        if they were put."""
        got: dict[str, np.ndarray] = {}
        for name, dtype, count, pos in lay.arrays:
            v = self.bytes[pos:pos + count * dtype.itemsize].view(dtype)
            v.flags.writeable = False
            got[name] = v
        grouped = {k[2:]: v for k, v in got.items() if k.startswith("g:")}
        const = {k[2:]: v for k, v in got.items() if k.startswith("c:")}
        return EventColumns(lay.n, got["table"], got.get("gid"), got.get("order"), got["ts"],
                            grouped, const), got.get("starts")


class Room:
    """Bytes [at, end) of an arena reserved for one block being decoded
    (:func:`~kvmtrace.core.columns.columns_into` its :meth:`alloc`)."""

    def __init__(self, arena: Arena, block: int, at: int, end: int) -> None:
        self.arena, self.block, self.at, self.end = arena, block, at, end
        self.pos = at

    def take(self, nbytes: int) -> int:
        """The offset of the next ``nbytes`` of the room (aligned)."""
        pos = self.pos
        self.pos += max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        if self.pos > self.end:
            raise AssertionError("a block larger than its bound")
        return pos

    def alloc(self, dtype: np.dtype, count: int) -> np.ndarray:
        """An array in the room; a private one when it would not fit (a damaged block
        whose events exceed its header's count: its decoder then fails as in one
        process)."""
        dtype = np.dtype(dtype)
        nbytes = count * dtype.itemsize
        if self.pos + max(ALIGN, -(-nbytes // ALIGN) * ALIGN) > self.end:
            return np.empty(count, dtype)
        pos = self.take(nbytes)
        return self.arena.bytes[pos:pos + nbytes].view(dtype)


def parent_alive(ppid: int) -> Callable[[], None]:
    """For a forked worker: raises once the process that forked it is gone."""

    def check() -> None:
        if os.getppid() != ppid:
            raise RuntimeError("the replay's first process is gone")

    return check
