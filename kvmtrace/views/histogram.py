"""A log2 histogram as terminal lines, in the habit of bcc's ``print_log2_hist``.

:func:`log2_hist_lines` is pure: log2 bucket counts in, lines out. Bucket ``i`` counts values
``v`` with ``2**i <= v < 2**(i+1)`` (bucket 0 also holds 0: the buckets of
:data:`kvmtrace.core.counters.HIST_BUCKETS` and of the BPF side's ``bpf_log2l``), so its
range is printed ``2**i -> 2**(i+1) - 1`` (``0 -> 1`` for bucket 0), in the values' own
unit (ns for stall time and reset latency). Three columns: the range, the count and a bar
of ``*`` proportional to the count (the largest count fills the bar; a non-zero count gets
at least one ``*``). Rows run from the first to the last non-empty bucket; an empty
histogram gives no lines. Every line fits in ``width`` columns.

Example (``log2_hist_lines([0, 0, 3, 1], "nsecs", 40)``)::

      nsecs : count    distribution
    4 -> 7  : 3        |*******************|
    8 -> 15 : 1        |******             |
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["bucket_range", "log2_hist_lines", "MIN_BAR"]

MIN_BAR = 10  #: the bar never gets narrower than this, whatever ``width`` says
COUNT_WIDTH = 8  #: the count column (wider counts push the bar right, still within width)


def bucket_range(i: int) -> tuple[int, int]:
    """The smallest and largest integer value of log2 bucket ``i``."""
    return (0 if i == 0 else 1 << i), (1 << (i + 1)) - 1


def log2_hist_lines(counts: Sequence[int], unit: str, width: int = 80) -> list[str]:
    """``counts`` (log2 buckets) as lines of at most ``width`` columns: a header naming
    ``unit``, then ``low -> high : count |bar|`` per bucket from the first to the last
    non-empty one; no lines when every count is 0."""
    nonzero = [i for i, n in enumerate(counts) if n]
    if not nonzero:
        return []
    first, last = nonzero[0], nonzero[-1]
    rows = [(bucket_range(i), counts[i]) for i in range(first, last + 1)]
    lo_w = max(len(str(lo)) for (lo, _), _ in rows)
    hi_w = max(len(str(hi)) for (_, hi), _ in rows)
    cnt_w = max(COUNT_WIDTH, max(len(str(n)) for _, n in rows))
    left = lo_w + 4 + hi_w  # "LOW -> HIGH"
    lead = max(0, len(unit) - left)  # a long unit name widens the range column
    left += lead
    fixed = left + 3 + cnt_w + 1 + 2  # " : " count " " "|" bar "|"
    bar = max(MIN_BAR, width - fixed)
    peak = max(n for _, n in rows)
    out = [f"{unit:>{left}} : {'count':<{cnt_w}} distribution"]
    for (lo, hi), n in rows:
        stars = (n * bar) // peak
        if n and not stars:
            stars = 1
        out.append(f"{'':{lead}}{lo:>{lo_w}} -> {hi:<{hi_w}} : {n:<{cnt_w}} "
                   f"|{'*' * stars:<{bar}}|")
    return out
