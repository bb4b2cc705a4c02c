"""Events as columns: the neutral form a source may hand out besides EVENT_DTYPE records.

A batch of :data:`~kvmtrace.core.events.EVENT_DTYPE` events (``struct kt_event``) is
split into *groups*, one per distinct (pid, tid, vm, ring, kind): every event of a group
shares those fields, so they are stored once in a small table. The other fields are
columns: ``ts`` in time order, and ``value``, ``dirty_index``, ``reset_index``, ``slot``
*group-major* (the events of group 0 in time order, then group 1's, ...), or once per
group when constant within each. This is how a recording stores a block
(docs/FORMAT.md), so a recording's columns cost no more than its decoding; any source may
produce them.

Readers: :meth:`EventColumns.events` gives the records back;
``kvmtrace.analysis.replay`` reads the columns directly (per ring, without building
48-byte records).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .events import EVENT_DTYPE

__all__ = ["GROUP_FIELDS", "COLUMN_FIELDS", "DIRTY_RESET_DTYPE", "EventColumns",
           "columns_into", "column_alloc"]

_here = threading.local()


@contextmanager
def columns_into(alloc: Callable[[np.dtype, int], np.ndarray]) -> Iterator[None]:
    """Within, a source that honours it (a recording's decoder) builds the per-event
    columns of the EventColumns it makes in this thread in ``alloc(dtype, count)``
    (writable, C-contiguous; e.g. shared memory) instead of new arrays."""
    prev = getattr(_here, "alloc", None)
    _here.alloc = alloc
    try:
        yield
    finally:
        _here.alloc = prev


def column_alloc() -> Callable[[np.dtype, int], np.ndarray] | None:
    """The allocator :func:`columns_into` set in this thread, if any."""
    return getattr(_here, "alloc", None)

#: Fields shared by the events of a group (the group table's fields).
GROUP_FIELDS = ("pid", "tid", "vm", "ring", "kind")
#: Per-event fields besides ``ts``, as EVENT_DTYPE names them.
COLUMN_FIELDS = ("value", "dirty_index", "reset_index", "slot")

#: A view of EVENT_DTYPE records whose one u64 field ``both`` is dirty_index (low half)
#: and reset_index (high half): adjacent u32 fields, read or written in one pass.
DIRTY_RESET_DTYPE = np.dtype({"names": ["both"], "formats": ["<u8"],
                         "offsets": [EVENT_DTYPE.fields["dirty_index"][1]],
                         "itemsize": EVENT_DTYPE.itemsize})
assert EVENT_DTYPE.fields["reset_index"][1] == EVENT_DTYPE.fields["dirty_index"][1] + 4


@dataclass
class EventColumns:
    """``n`` events in time order as columns (see the module docstring).

    ``groups``: the group table, a structured array with (at least) the
    :data:`GROUP_FIELDS`; ``gid``: each event's group number in time order (u1/u2), None
    when there is one group; ``order``: ``argsort(gid, stable)``, the time position of
    each group-major event (None with one group); ``ts``: u64 ns, time order;
    ``grouped``: columns of n values, group-major; ``const``: columns constant within
    every group, one value per group. Each of :data:`COLUMN_FIELDS` is in exactly one of
    ``grouped`` and ``const``; their dtypes are EVENT_DTYPE's unsigned ones.
    """

    n: int
    groups: np.ndarray
    gid: np.ndarray | None
    order: np.ndarray | None
    ts: np.ndarray
    grouped: dict[str, np.ndarray]
    const: dict[str, np.ndarray]
    #: :meth:`group_starts`, once computed (or given by the maker)
    starts: np.ndarray | None = None

    def template(self) -> np.ndarray:
        """One EVENT_DTYPE record per group: its group fields and its constant columns
        (``ts`` and the ``grouped`` columns zero)."""
        tmpl = np.zeros(len(self.groups), EVENT_DTYPE)
        for key in GROUP_FIELDS:
            tmpl[key] = self.groups[key]
        for name, v in self.const.items():
            tmpl[name] = v
        return tmpl

    def group_starts(self) -> np.ndarray | None:
        """Where each group's events start in the group-major columns, and their end
        (ngroups + 1 values); None with one group (no group numbers)."""
        if self.gid is None:
            return None
        if self.starts is None:  # computed once (a replay and its tap both ask)
            assert self.order is not None  # the group numbers in group-major order: sorted
            self.starts = np.searchsorted(np.take(self.gid, self.order),
                                          np.arange(len(self.groups) + 1))
        return self.starts

    def events(self) -> np.ndarray:
        """The events as EVENT_DTYPE records, in time order."""
        tmpl = self.template()
        gid, order = self.gid, self.order
        ev = tmpl.take(gid) if gid is not None else tmpl.take(np.zeros(self.n, np.intp))
        ev["ts"] = self.ts
        cols = dict(self.grouped)
        if order is not None and "dirty_index" in cols and "reset_index" in cols:
            both = cols.pop("dirty_index").astype(np.uint64)
            both |= np.left_shift(cols.pop("reset_index"), np.uint64(32), dtype=np.uint64)
            ev.view(DIRTY_RESET_DTYPE)["both"][order] = both
        for name, v in cols.items():
            if order is not None:
                ev[name][order] = v
            else:
                ev[name] = v
        return ev
