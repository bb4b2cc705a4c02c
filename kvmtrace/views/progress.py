"""Progress of long work on stderr: events done, rate and time left, with tqdm.

:class:`Progress` draws a tqdm bar on a stream (stderr) only when that stream is a terminal
and the user did not turn it off (``--no-progress``); otherwise every call is a no-op, so
a pipe or a log file gets no progress text. It counts in whatever unit the caller says
(events for a replay, repetitions for a bench) and shows the time left when the total is
known (a recording's events: its block index, up front; a text trace's: once its first
read of the file is done, which the bar spends at 0).

The hook is :meth:`Progress.update`, a callback on events (or blocks) consumed, called once
per block, never per event: whichever driver feeds a replay (one process, or workers
handing back per-block results) calls it with the events it finished.
:func:`track` wraps an :class:`~kvmtrace.core.sources.EventSource` so that every block
its reader takes from :meth:`~kvmtrace.core.sources.EventSource.batches` or
:meth:`~kvmtrace.core.sources.EventSource.column_batches` is counted when the reader
comes back for the next one (the block is done then), for readers that take a source.

A command adds ``--no-progress`` with :func:`kvmtrace.commands.args.add_progress` and::

    with Progress("replay", events_total(src), enabled=args.progress) as bar:
        report = replay_source(track(src, bar))
    with Progress("bench", reps, unit="reps", enabled=args.progress) as bar:
        for _ in range(reps):
            run_one()
            bar.update(1)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from ..core.sources import EventSource
from ..source.recording import Recording
from ..source.textsource import TextSource

if TYPE_CHECKING:
    from ..core.columns import EventColumns

__all__ = ["Progress", "ProgressSource", "track", "events_total", "MIN_INTERVAL_S"]

MIN_INTERVAL_S = 0.2  #: the bar is redrawn at most this often


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _size(stream: IO[str]) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return 0, 0
    return size.columns, size.lines


class Progress:
    """A progress bar on ``stream`` (stderr by default) when it is a terminal and
    ``enabled`` is not False; silent otherwise. ``total``: units expected (None unknown:
    no time left shown); ``unit``: what is counted ("events", "reps")."""

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "events",
                 enabled: bool = True, stream: IO[str] | None = None) -> None:
        out = sys.stderr if stream is None else stream
        self.active = bool(enabled) and _is_terminal(out)
        self.done = 0  #: units counted so far (counted when active or not)
        self.total = total or None  #: units expected; None unknown
        self._bar: Any = None
        if self.active:
            from tqdm import tqdm

            cols, rows = _size(out)  # a terminal that reports no size (0 x 0): 80 x 24
            self._bar = tqdm(total=total or None, desc=desc, unit=f" {unit}", unit_scale=True,
                             file=out, mininterval=MIN_INTERVAL_S, leave=False,
                             dynamic_ncols=bool(cols and rows), ncols=cols or 80,
                             nrows=rows or 24)

    def set_total(self, total: int) -> None:
        """The units expected, learnt late (a text trace's events after its first read)."""
        if total:
            self.total = total
        if self._bar is not None and total:
            self._bar.total = total
            self._bar.refresh()

    def update(self, n: int) -> None:
        """``n`` more units done (call per block of work, not per event)."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Remove the bar (a finished bar leaves no line behind)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def events_total(source: EventSource) -> int | None:
    """Events ``source`` will yield, when known before they are all read: a recording's
    block index counts them; a text trace knows once its first read of the file is done
    (it reads it twice); None otherwise."""
    if isinstance(source, Recording):
        return int(source.events)
    if isinstance(source, TextSource):
        return source.events
    return None


class ProgressSource(EventSource):
    """``inner`` as it is, but each block a reader takes is counted on ``progress`` once
    the reader asks for the next block (or finishes)."""

    def __init__(self, inner: EventSource, progress: Progress) -> None:
        self.inner = inner
        self.meta = inner.meta
        self.progress = progress

    def batches(self) -> Iterator[np.ndarray]:
        first = True
        for batch in self.inner.batches():
            if first and self.progress.total is None:  # known by now? (text traces)
                self.progress.set_total(events_total(self.inner) or 0)
            first = False
            yield batch
            self.progress.update(len(batch))

    def column_batches(self) -> Iterator[EventColumns] | None:
        cols = self.inner.column_batches()
        return None if cols is None else self._counted(cols)

    def column_blocks(self, start: int = 0, step: int = 1) -> Iterator[EventColumns] | None:
        """The inner source's, uncounted: a replay spread over processes reads these and
        counts its blocks itself (``on_block``)."""
        return self.inner.column_blocks(start, step)

    def group_tables(self) -> Iterator[tuple[int, np.ndarray | None]] | None:
        return self.inner.group_tables()

    def _counted(self, cols: Iterator[EventColumns]) -> Iterator[EventColumns]:
        for part in cols:
            yield part
            self.progress.update(part.n)

    @property
    def lost(self) -> int:
        return self.inner.lost

    @property
    def truncated(self) -> bool:
        return self.inner.truncated

    @property
    def warnings(self) -> list[str]:
        return self.inner.warnings

    @property
    def unsure(self) -> set[tuple[int, int, int]]:
        return self.inner.unsure

    def close(self) -> None:
        self.inner.close()


def track(source: EventSource, progress: Progress) -> EventSource:
    """``source`` counted on ``progress`` (``source`` itself when the bar is off: no cost)."""
    return ProgressSource(source, progress) if progress.active else source
