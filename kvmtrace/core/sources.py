"""The two source interfaces every view reads from.

- :class:`EventSource`: a stream of :data:`~kvmtrace.core.events.EVENT_DTYPE` batches
  (a recording, an imported ftrace or ``perf script`` text, the live BPF ring buffer).
- :class:`SnapshotSource`: cumulative per-ring counters at points in time
  (:class:`~kvmtrace.core.counters.Snapshot`), read from live in-kernel BPF maps or
  computed from any EventSource by :class:`~kvmtrace.analysis.aggregate.Aggregator`.

``top``, ``replay`` and exports take either kind through these interfaces, so they cannot
tell a live kernel from a file. Both are abstract base classes: every source subclasses
one, and what a caller may ask of any source (``truncated``, ``warnings``, ``unsure``,
``done``, ``close()``, ``column_batches``) is declared here with its default, so callers
use plain attribute access.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .counters import VmName

if TYPE_CHECKING:
    from .columns import EventColumns
    from .counters import Snapshot

__all__ = ["SourceMeta", "EventSource", "SnapshotSource"]


@dataclass
class SourceMeta:
    """What a source knows about where its events came from.

    ring_entries maps (pid, vm) -> ring size in entries (struct kvm_dirty_gfn, 16 bytes
    each); a key (pid, -1) or (-1, -1) is a default for that pid or for everything.
    vms maps (pid, vm) -> the VM's :class:`~kvmtrace.core.counters.VmName` (VMM kind, name,
    comm) as the recorder found it; empty where the source knows none (text traces, files
    of format 1.1 and older).
    """

    kind: str  # "recording", "ftrace", "perf-script", "live"
    kernel_release: str | None = None
    host: str | None = None
    start_time: float | None = None  # wall clock, seconds since the epoch
    hooks: dict[str, str] = field(default_factory=dict)  # event name -> "raw_tp"/"tp"/...
    tracepoint_formats: dict[str, str] = field(default_factory=dict)
    ring_entries: dict[tuple[int, int], int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    vms: dict[tuple[int, int], VmName] = field(default_factory=dict)

    def vm_name(self, pid: int, vm: int) -> VmName | None:
        """The VmName of (pid, vm), else of another VM of that process (names belong to the
        process: its command line), else None."""
        found = self.vms.get((pid, vm))
        if found is None:
            found = next((v for (p, _vm), v in sorted(self.vms.items()) if p == pid), None)
        return found

    def ring_size(self, pid: int, vm: int) -> int | None:
        for key in ((pid, vm), (pid, -1), (-1, -1)):
            if key in self.ring_entries:
                return self.ring_entries[key]
        return None


class EventSource(ABC):
    """A stream of events in time order; subclasses set :attr:`meta` and define
    :meth:`batches` and :attr:`lost`. The rest has defaults a source overrides when it
    knows more (a recording cut short, a text trace whose rings could not be told apart).
    """

    meta: SourceMeta

    @abstractmethod
    def batches(self) -> Iterator[np.ndarray]:
        """Events in time order, as EVENT_DTYPE arrays of any length."""

    def column_batches(self) -> Iterator[EventColumns] | None:
        """The same events as columns, one block at a time (a recording's decoded blocks in
        file order), for readers that can skip building EVENT_DTYPE records; None when the
        source has no columns of its own (read :meth:`batches`)."""
        return None

    def column_blocks(self, start: int = 0, step: int = 1) -> Iterator[EventColumns] | None:
        """As :meth:`column_batches`, blocks ``start``, ``start + step``, ... only (one of
        ``step`` readers sharing the blocks); None when the source has no blocks."""
        return None

    def group_tables(self) -> Iterator[tuple[int, np.ndarray | None]] | None:
        """Per block of :meth:`column_batches`, its number of events and its group table
        (the distinct (pid, tid, vm, ring, kind) of its events,
        :data:`~kvmtrace.core.columns.GROUP_FIELDS`; None when unknown), read cheaply for
        planning (a replay spreading rings over cores); None when the source has no such
        blocks."""
        return None

    @property
    @abstractmethod
    def lost(self) -> int:
        """Lost events: events the producer could not deliver (known once batches() is
        exhausted)."""

    @property
    def truncated(self) -> bool:
        """True when the source ends early (a recording whose writer was killed)."""
        return False

    @property
    def warnings(self) -> list[str]:
        """One line each: what the source could not tell (known once batches() ran)."""
        return []

    @property
    def unsure(self) -> set[tuple[int, int, int]]:
        """(pid, vm, ring index) of rings whose resets the source could not tell apart:
        a replay claims no anomaly of theirs (known once batches() ran)."""
        return set()

    def close(self) -> None:
        """Release what the source holds (files, probes); a no-op by default."""
        return None


class SnapshotSource(ABC):
    """Cumulative counters at points in time; subclasses set :attr:`meta` and define
    :meth:`snapshot`."""

    meta: SourceMeta

    @abstractmethod
    def snapshot(self) -> Snapshot:
        """Cumulative counters now (live) or at the source's current position."""

    @property
    def done(self) -> bool:
        """True once a file source has fed every event (its snapshots no longer move);
        a live source is never done."""
        return False

    @property
    def warnings(self) -> list[str]:
        """One line each: what the underlying events could not tell."""
        return []

    def close(self) -> None:
        """Release what the source holds (probes, sockets); a no-op by default."""
        return None
