"""kvmtrace: observability for the KVM dirty ring (KVM_CAP_DIRTY_LOG_RING).

Layout follows the data's path:

- ``bpf/probes/`` (package data): BPF C on the dirty-ring tracepoints.
- :mod:`kvmtrace.host`: facts about the running kernel (preflight, tracefs, BTF, headers).
- :mod:`kvmtrace.bpf`: loads the probes and reads their maps and ring buffers.
- :mod:`kvmtrace.source`: event sources (live BPF, recordings, imported ftrace/perf text).
- :mod:`kvmtrace.model`: a userspace model of ``struct kvm_dirty_ring``.
- :mod:`kvmtrace.analysis`: aggregation and replay.
- :mod:`kvmtrace.views`: text, curses, JSON, Prometheus, Parquet and Perfetto output.
- :mod:`kvmtrace.vmm`: the built-in VMM (``kvmtrace workload``), a real dirty-ring guest.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
