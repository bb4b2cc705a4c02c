"""The histogram pane of ``kvmtrace top`` (key ``H``, or ``top -b --hist``).

Live, only the in-kernel log2 histograms exist (no event is kept), so this pane shows them
as they are: the interval's soft-full stall time summed over the rings shown
(:attr:`~kvmtrace.analysis.rates.RingRates.stall_hist`, exit 31 to the next ``KVM_RUN``)
and the interval's ``KVM_RESET_DIRTY_RINGS`` latency summed over the VMs shown
(:attr:`~kvmtrace.analysis.rates.VmRates.reset_lat_hist`), each drawn by
:func:`~.histogram.log2_hist_lines` under a line giving the count and the percentiles as
upper bounds (``p50<=``: the top of the bucket holding the median). Exact percentiles need
the events: ``kvmtrace record`` then ``kvmtrace replay --hist``.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..analysis.rates import Interval
from ..core.counters import HIST_BUCKETS, hist_percentile
from .histogram import log2_hist_lines
from .top_render import fmt_ns

__all__ = ["top_hist_lines", "upper_bounds"]


def _sum(hists: Iterable[list[int]]) -> list[int]:
    out = [0] * HIST_BUCKETS
    for h in hists:
        for i, n in enumerate(h[:HIST_BUCKETS]):
            out[i] += n
    return out


def upper_bounds(hist: list[int], what: str) -> str:
    """``N what: p50<=X p99<=Y`` for a log2 histogram (ns): the count and the upper bounds
    of the buckets holding the 50th and 99th percentiles; ``no what`` when empty."""
    n = sum(hist)
    if not n:
        return f"no {what}"
    return (f"{n} {what}: p50<={fmt_ns(hist_percentile(hist, 0.5))} "
            f"p99<={fmt_ns(hist_percentile(hist, 0.99))} (log2 bucket upper bounds)")


def top_hist_lines(iv: Interval, width: int = 80) -> list[str]:
    """The pane for ``iv``: stall time over its rings and reset latency over its VMs, this
    interval, as log2 histograms of at most ``width`` columns."""
    stall = _sum(r.stall_hist for r in iv.rings)
    reset = _sum(v.reset_lat_hist for v in iv.vms)
    out = ["stall time this interval, rings shown (exit 31 to the next KVM_RUN):",
           "  " + upper_bounds(stall, "stalls")]
    out += log2_hist_lines(stall, "nsecs", width)
    out += ["", "KVM_RESET_DIRTY_RINGS latency this interval, VMs shown:",
            "  " + upper_bounds(reset, "ioctls")]
    out += log2_hist_lines(reset, "nsecs", width)
    return [line[:width] for line in out]
