"""testing: oracles and generators the tests and benchmarks hold the fast paths to (top
floor: may import anything, nothing in the package imports it).

- :mod:`.reference`: the reference replay, one event at a time over
  :class:`kvmtrace.model.ring.DirtyRing`; the fast replay (:mod:`kvmtrace.analysis.replay`)
  must agree with it exactly.
- :mod:`.synth`: synthetic event streams from model rings (:class:`~.synth.SynthVm`), bulk
  streams for benchmarks (:func:`~.synth.bulk_stream`) and VMM-like streams with jitter
  (:func:`~.synth.workload_stream`).
- :mod:`.qemu`: QEMU as a test peer: start it on the multiboot guest, QMP through
  ``qemu.qmp``, its own ``calc-dirty-rate`` figures and kvmtrace's beside them.
- :mod:`.vm_cycles`: cycles of concurrent built-in VMs in one process, held on stdin until
  a tracer is attached (``python -m kvmtrace.testing.vm_cycles PLAN``).
- :mod:`.prog_run`: runs a BPF program in the kernel (BPF_PROG_TEST_RUN), a producer for
  the ring-buffer tests and benchmark.
- :mod:`.held`: attach a tracer to a held child, then release it and read its JSON.
- :mod:`.snapshot_watch`: a vm_cycles child under the probes with a snapshot loop, and
  the laws the snapshots obey (live top's tests and tools/soak_top.py).
- :mod:`.qemu_migrate`, :mod:`.qemu_livelock`, :mod:`.qemu_dirtylimit`: QEMU migrating,
  livelocked after an overflow and under a dirty limit, recorded; :mod:`.qemu_trace`
  reads QEMU's own trace (``-trace``) as their ground truth.
"""
