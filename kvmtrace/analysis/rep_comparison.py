"""Compare two sets of repetitions (benchmark bundles) metric by metric, with intervals.

Each repetition (one trace) gives one value per metric (:class:`~kvmtrace.analysis.bundle.
RepMetrics`): push rate per vCPU, dirty MB/s, soft-full exits per 1,000 pushes, entries per
reset, and the exact p50/p90/p99 of that run's stalls and reset latencies. A metric's change
is that of the mean over repetitions, ``100 * (mean_new - mean_base) / mean_base``.

Interval: Welch's t-interval of ``mean_new - mean_base`` over the repetitions' values, as a
percentage of ``mean_base``, at :data:`CONFIDENCE` (99.4 %): 95 % for the comparison as a
whole, split over the :data:`JUDGED` metrics that get a verdict (Bonferroni), since a
comparison that judges nine metrics at 95 % each calls one of them changed far more often
than one time in twenty (measured on this host: 10 % of same-vs-same bundle pairs at 95 %
each, 3-4 % with the correction; tools/bench_fp_rate.py).

Why t and not a bootstrap: bundles hold few repetitions (3-10); a bootstrap of 3 values
has 10 distinct resamples and its percentile interval is too narrow at such sizes, while
Welch's interval is built for small samples and unequal variances (a slower kernel is
often a noisier one). The variation inside one run (thousands of stalls) is not used:
runs differ more from each other than their own samples say. With one repetition on a
side, that side's variance is taken to be the other side's (df of the other side); with
one on both sides there is no interval (``kvmtrace compare`` then compares the two traces
themselves, :func:`~kvmtrace.analysis.comparison.compare_profiles`).

Verdict (metrics with a direction): ``regression``/``improvement`` when the whole
interval lies beyond the metric's threshold (:class:`~kvmtrace.analysis.comparison.
Thresholds`, default 10 %) on the bad/good side: the change is then beyond the threshold
with the interval's confidence, not merely different from zero. Else ``same``. Tails (p90
of a hundred stalls) on a loaded host jump by far more than 10 % from run to run, so a
threshold alone does not keep noise quiet; the interval does. Entries per reset has no
direction (None). Anomalies (stuck or overflowed rings) are judged per
:func:`~kvmtrace.analysis.comparison.compare_anomalies`; while either side has one, the
stall and reset-latency percentiles get no verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .bundle import RepMetrics
from .comparison import AnomalyRow, Thresholds, Verdict, compare_anomalies

__all__ = [
    "REP_SCHEMA",
    "FAMILY_CONFIDENCE",
    "JUDGED",
    "CONFIDENCE",
    "INTERVAL_METHOD",
    "REP_METRICS",
    "t_quantile",
    "welch_interval",
    "RepRow",
    "RepComparison",
    "compare_reps",
]

REP_SCHEMA = 2  #: version of RepComparison.to_dict() (schema 1: two single traces)
FAMILY_CONFIDENCE = 0.95  #: of all a comparison's verdicts together (Bonferroni)
INTERVAL_METHOD = "welch-t"

#: (key, name, unit, direction: +1 higher is better, -1 lower is better, 0 none)
REP_METRICS: tuple[tuple[str, str, str, int], ...] = (
    ("push_rate_per_vcpu", "push rate/vCPU", "1/s", +1),
    ("dirty_mbps", "dirty MB/s", "MB/s", +1),
    ("soft_full_per_1k", "soft-full/1k pushes", "per 1k", -1),
    ("entries_per_reset", "entries per reset", "entries", 0),
    ("stall_p50", "stall p50", "ns", -1),
    ("stall_p90", "stall p90", "ns", -1),
    ("stall_p99", "stall p99", "ns", -1),
    ("reset_lat_p50", "reset latency p50", "ns", -1),
    ("reset_lat_p90", "reset latency p90", "ns", -1),
    ("reset_lat_p99", "reset latency p99", "ns", -1),
)
_DISTRIBUTIONS = ("stall_", "reset_lat_")
JUDGED = sum(1 for *_, sign in REP_METRICS if sign)  #: metrics that get a verdict
#: each metric's interval: Bonferroni over the JUDGED metrics, so that a comparison of two
#: bundles of one scenario calls nothing a change with 95 % confidence as a whole
CONFIDENCE = 1.0 - (1.0 - FAMILY_CONFIDENCE) / JUDGED

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for aa in (m * (b - m) * x / ((a - 1 + 2 * m) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1 + 2 * m))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    ln = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x)
          + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_quantile(df: float, q: float = 0.975) -> float:
    """Student's t ``q``-quantile (q > 0.5) for ``df`` degrees of freedom (fractional, as
    Welch's gives; df < 1 is taken as 1): the tail ``0.5 * I_{df/(df+t^2)}(df/2, 1/2)``
    solved for ``1 - q`` by bisection (no scipy here)."""
    df = max(1.0, df)

    def tail(t: float) -> float:
        return 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))

    lo, hi = 0.0, 1.0
    while tail(hi) > 1.0 - q:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if tail(mid) > 1.0 - q else (lo, mid)
    return (lo + hi) / 2.0


def welch_interval(base: Sequence[float], new: Sequence[float], confidence: float = 0.95
                   ) -> tuple[float, float] | None:
    """``confidence`` interval of ``mean(new) - mean(base)``; None with one value on both
    sides."""
    nb, nn = len(base), len(new)
    if nb == 0 or nn == 0 or (nb < 2 and nn < 2):
        return None
    vb = float(np.var(base, ddof=1)) if nb > 1 else None
    vn = float(np.var(new, ddof=1)) if nn > 1 else None
    if vb is None:
        vb, df = vn, nn - 1.0
    elif vn is None:
        vn, df = vb, nb - 1.0
    else:
        df = 0.0
    assert vb is not None and vn is not None
    se2 = vb / nb + vn / nn
    if se2 == 0:
        diff = float(np.mean(new) - np.mean(base))
        return diff, diff
    if not df:
        den = (vb / nb) ** 2 / (nb - 1) + (vn / nn) ** 2 / (nn - 1)
        df = se2 ** 2 / den
    half = t_quantile(df, 1.0 - (1.0 - confidence) / 2.0) * math.sqrt(se2)
    diff = float(np.mean(new) - np.mean(base))
    return diff - half, diff + half


@dataclass
class RepRow:
    """One metric across repetitions: the values per run, their means, the change of the
    mean and its interval in percent of the base mean, and the verdict."""

    key: str
    name: str
    unit: str
    direction: int
    base_values: list[float]
    new_values: list[float]
    threshold_pct: float
    base_mean: float | None = None
    new_mean: float | None = None
    change_pct: float | None = None
    ci_low_pct: float | None = None
    ci_high_pct: float | None = None
    verdict: str | None = None
    note: str | None = None  #: why there is no verdict, when that is not plain

    @property
    def significant(self) -> bool | None:
        if self.ci_low_pct is None or self.ci_high_pct is None:
            return None
        return self.ci_low_pct > 0 or self.ci_high_pct < 0

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "unit": self.unit,
                "direction": self.direction, "base": self.base_values,
                "new": self.new_values, "base_mean": self.base_mean,
                "new_mean": self.new_mean, "change_pct": self.change_pct,
                "ci_low_pct": self.ci_low_pct, "ci_high_pct": self.ci_high_pct,
                "significant": self.significant, "threshold_pct": self.threshold_pct,
                "verdict": self.verdict, "note": self.note}


@dataclass
class RepComparison:
    """Everything ``kvmtrace compare`` reports on two bundles."""

    base: list[RepMetrics]
    new: list[RepMetrics]
    thresholds: Thresholds
    rows: list[RepRow] = field(default_factory=list)
    anomalies: list[AnomalyRow] = field(default_factory=list)

    @property
    def regressions(self) -> list[str]:
        """Names of what regressed: metrics, then anomalies (``"stuck: stranded"``)."""
        return ([r.name for r in self.rows if r.verdict == Verdict.REGRESSION]
                + [f"ring {a.kind}" for a in self.anomalies
                   if a.verdict == Verdict.REGRESSION])

    @property
    def improvements(self) -> list[str]:
        return ([r.name for r in self.rows if r.verdict == Verdict.IMPROVEMENT]
                + [f"ring {a.kind}" for a in self.anomalies
                   if a.verdict == Verdict.IMPROVEMENT])

    @property
    def exit_status(self) -> int:
        return 1 if self.regressions else 0

    def to_dict(self) -> dict[str, Any]:
        """The metric part of ``--json`` (the command adds each side's bundle)."""
        return {"schema": REP_SCHEMA,
                "interval": {"method": INTERVAL_METHOD, "confidence": CONFIDENCE,
                             "family_confidence": FAMILY_CONFIDENCE,
                             "correction": "bonferroni", "judged": JUDGED,
                             "over": "repetition means"},
                "thresholds": self.thresholds.to_dict(),
                "regressions": len(self.regressions),
                "improvements": len(self.improvements),
                "metrics": [r.to_dict() for r in self.rows],
                "anomalies": [a.to_dict() for a in self.anomalies]}


def compare_reps(base: Sequence[RepMetrics], new: Sequence[RepMetrics],
                 thresholds: Thresholds | None = None) -> RepComparison:
    """Every metric of :data:`REP_METRICS` across the runs of ``base`` and ``new``."""
    th = thresholds or Thresholds()
    cmp = RepComparison(list(base), list(new), th)
    cmp.anomalies = compare_anomalies([r.anomalies for r in base], [r.anomalies for r in new])
    anomalous = bool(cmp.anomalies)
    for key, name, unit, sign in REP_METRICS:
        vb = [v for r in base if (v := r.value(key)) is not None]
        vn = [v for r in new if (v := r.value(key)) is not None]
        row = RepRow(key, name, unit, sign, vb, vn, th.pct(key))
        cmp.rows.append(row)
        if not vb or not vn:
            row.note = "no values on one side" if vb or vn else "no values"
            continue
        row.base_mean, row.new_mean = float(np.mean(vb)), float(np.mean(vn))
        if row.base_mean == row.new_mean:
            row.change_pct = 0.0
        elif row.base_mean:
            row.change_pct = 100.0 * (row.new_mean - row.base_mean) / row.base_mean
        ci = welch_interval(vb, vn, CONFIDENCE)
        if ci is not None and row.base_mean:
            row.ci_low_pct = 100.0 * ci[0] / abs(row.base_mean)
            row.ci_high_pct = 100.0 * ci[1] / abs(row.base_mean)
        if not sign:
            continue
        if anomalous and key.startswith(_DISTRIBUTIONS):
            row.note = "no verdict: a ring overflowed or got stuck"
            continue
        if row.change_pct is None or row.significant is None:
            row.note = "no interval (one run per side, or a zero base)"
            continue
        row.verdict = Verdict.SAME
        assert row.ci_low_pct is not None and row.ci_high_pct is not None
        if row.ci_low_pct > row.threshold_pct or row.ci_high_pct < -row.threshold_pct:
            worse = (row.change_pct > 0) == (sign < 0)
            row.verdict = Verdict.REGRESSION if worse else Verdict.IMPROVEMENT
    return cmp
