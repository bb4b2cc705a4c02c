"""model (floor 2): the userspace model of the dirty ring and what a replay reports.

- :mod:`.ring`: ``struct kvm_dirty_ring`` of one vCPU, one kernel operation per call.
- :mod:`.results`: :class:`~.results.Anomaly` and :class:`~.results.RingResult`, shared by
  the reference replay (:mod:`kvmtrace.testing.reference`) and the fast one.
- :mod:`.sizes`: where a VM's ring size comes from (trace, meta, inference): the one
  policy (:class:`~.sizes.RingSizes`, :func:`~.sizes.live_ring_size`).
- :mod:`.digest`: an order-independent digest of a multiset of (slot, offset) entries.
- :mod:`.reservoir`: a bounded uniform sample of a stream of values (exact up to its cap),
  behind the exact percentiles of :class:`~.results.Durations` and of ``compare``.
"""
