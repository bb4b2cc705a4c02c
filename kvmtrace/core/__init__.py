"""core: the floor every other package stands on; imports nothing from kvmtrace but
``errors``.

- :mod:`.kvm_abi`: kernel ABI facts of the dirty ring, defined once: ``struct
  kvm_dirty_gfn`` (16 bytes) and its flags, the reserve (64, plus 512 with Intel PML), the
  size limits, u32/s32 serial arithmetic, ring-size inference, the ``vm`` packing.
- :mod:`.columns`: :class:`~.columns.EventColumns`, events as columns (group table, ts,
  per-group columns): what a recording stores and what replay reads.
- :mod:`.events`: the event record (``EVENT_DTYPE``, twin of ``struct kt_event``) and
  :class:`~.events.Kind`.
- :mod:`.counters`: per-ring and per-VM counters (``RingKey`` -> ``RingCounters``,
  ``VmKey`` -> ``VmCounters``) and snapshots, the currency of every view.
- :mod:`.sources`: :class:`~.sources.SourceMeta` and the EventSource / SnapshotSource
  base classes (what any source answers, with defaults).

Glossary: *overwritten* entries were lost to ring overflow (a push onto an entry not yet
collected by a reset); *stranded* entries were pushed while the ring was stuck after an
overflow; *lost events* are events the tracer itself dropped.
"""
