"""Importer for ``perf script`` text of ``perf record -e kvm:kvm_dirty_ring_push -e
kvm:kvm_dirty_ring_reset -e kvm:kvm_dirty_ring_exit [-e kvm:kvm_userspace_exit]``.

The default ``perf script`` line is ``comm tid [cpu] sec.usec: kvm:name: fields``; with
``-F comm,pid,tid,cpu,time,event,trace`` the tid becomes ``pid/tid`` and the VMM's pid is
known. ``perf script --ns`` prints nanoseconds; both are read. perf reports lost samples
on stderr only, so :attr:`PerfScriptSource.lost` stays 0. Semantics and limits of text
traces: :mod:`kvmtrace.source.textsource`.
"""

from __future__ import annotations

from .textsource import TextSource

__all__ = ["PerfScriptSource"]


class PerfScriptSource(TextSource):
    """EventSource over ``perf script`` text; meta.kind is ``"perf-script"``."""

    kind = "perf-script"
    perf = True
