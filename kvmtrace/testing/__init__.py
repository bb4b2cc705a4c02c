"""testing: oracles and generators the tests and benchmarks hold the fast paths to (top
floor: may import anything, nothing in the package imports it).

- :mod:`.reference`: the reference replay, one event at a time over
  :class:`kvmtrace.model.ring.DirtyRing`; the fast replay (:mod:`kvmtrace.analysis.replay`)
  must agree with it exactly.
- :mod:`.synth`: synthetic event streams from model rings (:class:`~.synth.SynthVm`) and
  bulk streams for benchmarks (:func:`~.synth.bulk_stream`).
- :mod:`.vm_cycles`: cycles of concurrent built-in VMs in one process, held on stdin until
  a tracer is attached (``python -m kvmtrace.testing.vm_cycles PLAN``).
- :mod:`.qemu_migrate`, :mod:`.qemu_livelock`, :mod:`.qemu_dirtylimit`: QEMU migrating,
  livelocked after an overflow and under a dirty limit, recorded; :mod:`.qemu_trace`
  reads QEMU's own trace (``-trace``) as their ground truth.
"""
