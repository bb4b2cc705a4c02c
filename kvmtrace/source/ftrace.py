"""Importer for tracefs text: the ``trace`` or ``trace_pipe`` file with the events
``kvm:kvm_dirty_ring_push``, ``kvm_dirty_ring_reset``, ``kvm_dirty_ring_exit`` and/or
``kvm_userspace_exit`` enabled (lines ``comm-tid [(tgid)] [cpu] flags sec.usec: name: ...``).

Semantics and limits of text traces: :mod:`kvmtrace.source.textsource`. ``[LOST n EVENTS]``
lines (ring buffer overruns) count into :attr:`FtraceSource.lost`.
"""

from __future__ import annotations

from .textsource import TextSource

__all__ = ["FtraceSource"]


class FtraceSource(TextSource):
    """EventSource over tracefs text; meta.kind is ``"ftrace"``."""

    kind = "ftrace"
    perf = False
