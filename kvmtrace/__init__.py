"""kvmtrace: observability for the KVM dirty ring (KVM_CAP_DIRTY_LOG_RING).

Layout follows the data's path; imports only go down the floors (tests/test_imports.py):

- :mod:`kvmtrace.core` (floor 0, with :mod:`kvmtrace.errors`): kernel ABI facts, the event
  record, the counters and the source interfaces every other package shares.
- :mod:`kvmtrace.host` (1): facts about the running kernel (preflight, tracefs, BTF,
  headers, KVM ioctls).
- :mod:`kvmtrace.bpf` (2): loads the probes (``bpf/probes/``, package data) and is both live
  sources (maps for ``top``, ring buffer for ``record``).
- :mod:`kvmtrace.source` (2): file sources (recordings, imported ftrace/perf text).
- :mod:`kvmtrace.model` (2): a userspace model of ``struct kvm_dirty_ring``, results.
- :mod:`kvmtrace.vmm` (2): the built-in VMM (``kvmtrace workload``), a real dirty-ring guest.
- :mod:`kvmtrace.analysis` (3): aggregation and replay.
- :mod:`kvmtrace.views` (4): text, curses, JSON, Prometheus, Parquet and Perfetto output.
- :mod:`kvmtrace.commands` (5), :mod:`kvmtrace.cli` (6): one module per subcommand.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
