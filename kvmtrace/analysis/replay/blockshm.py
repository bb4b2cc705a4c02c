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

__all__ = ["ALIGN", "Arena", "Done", "Layout", "arena_bytes", "block_bytes"]

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


def arena_bytes(blocks: list[tuple[int, int]], window_events: int, ahead: int) -> int:
    """Size of an arena for blocks of these (events, groups): room for any run of blocks
    that spans ``window_events`` events (what a reader's replay may still hold, not yet
    done: :data:`.colfeed.COLUMN_BATCH` and one block), then ``ahead`` + 3 more of the
    largest blocks (what a writer runs ahead), and the bytes a ring wastes at its end."""
    if not blocks:
        return ALIGN
    sizes = [block_bytes(n, g) for n, g in blocks]
    counts = [n for n, _ in blocks]
    most = 0  # the most bytes of consecutive blocks within the window (two pointers)
    lo = run_b = run_n = 0
    for hi in range(len(sizes)):
        run_b += sizes[hi]
        run_n += counts[hi]
        while run_n - counts[lo] >= window_events and lo < hi:
            run_b -= sizes[lo]
            run_n -= counts[lo]
            lo += 1
        most = max(most, run_b)
    big = max(sizes)
    return most + (ahead + 4) * big


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

    def least(self, but: int) -> int | None:
        """The lowest mark of the workers other than ``but`` (None: no other)."""
        others = np.delete(self.at, but)
        return int(others.min()) if len(others) else None


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

    def put(self, block: int, parts: EventColumns, done: Done, me: int,
            alive: Callable[[], None], starts: np.ndarray | None = None) -> Layout:
        """Copy a decoded block in (waiting for room: ``alive()`` raises if a worker it
        waits for is gone), with its groups' ``starts`` when given, and return where its
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
        sizes = [-(-a.nbytes // ALIGN) * ALIGN for _, a in arrays]
        need = max(ALIGN, sum(sizes))
        low = done.least(me)
        self.free(block if low is None else low)
        at = self._place(need)
        while at is None:
            alive()
            time.sleep(0.0002)
            low = done.least(me)
            self.free(block if low is None else low)
            at = self._place(need)
        out, pos = [], at
        for (name, a), sz in zip(arrays, sizes, strict=True):
            a = np.ascontiguousarray(a)
            self.bytes[pos:pos + a.nbytes] = a.view(np.uint8).reshape(-1)
            out.append((name, a.dtype, len(a), pos))
            pos += sz
        self.head = at + need
        self.live.append((block, at, at + need))
        return Layout(block, parts.n, tuple(out), at, at + need)

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


def parent_alive(ppid: int) -> Callable[[], None]:
    """For a forked worker: raises once the process that forked it is gone."""

    def check() -> None:
        if os.getppid() != ppid:
            raise RuntimeError("the replay's first process is gone")

    return check
