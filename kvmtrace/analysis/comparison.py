"""Compare two :class:`~kvmtrace.analysis.profile.Profile` objects metric by metric.

For every ring index present in either trace (and the ``"all"`` row) each metric gets the
base value, the new value, ``ratio = new / base`` and a verdict:

- ``"regression"`` / ``"improvement"``: the change exceeds the threshold (default 10 %) in
  the bad / good direction and, for percentiles of a distribution, the bootstrap interval
  of the percentile difference excludes zero
  (:func:`~kvmtrace.analysis.distribution.percentile_shift`), so noise gives no verdict;
- ``"same"``: a metric with a direction that did neither;
- None: nothing to judge (a value missing on one side, or a metric without a direction:
  the counts (pushes, soft-full exits, resets, entries reset), entries per reset, the
  maximum of a distribution; stall percentiles when one trace has measured stalls and the
  other only derived ones).

Directions: push rate (dirty pages per second) higher is better; stall and reset-latency
percentiles, soft-full exits per 10k pushes, max used, overwritten entries and lost events
lower is better. A ratio with a zero base is None (and the change is infinite unless the
new value is zero too); a ratio of two equal values is 1.0.

Thresholds: one default (``--threshold PCT``) and any per metric (:class:`Thresholds`, a
metric named by its key: ``stall_p50``, ``push_rate``, ``soft_full_exits_10k``, ...).

Anomalies (:class:`AnomalyRow`): a ring that overflowed (entries overwritten) or got stuck
(:mod:`kvmtrace.analysis.stuck`: ``stranded``, ``no_reset_progress``, ``overflow``) in NEW
but in no BASE run is a regression in itself; gone from NEW, an improvement; in both,
no verdict. While either side has one, stall and reset-latency percentiles get no
verdict: a livelocked VMM's many tiny stalls (exit 31 straight back into KVM_RUN) would
otherwise read as "stall improved".

Each side of the JSON (``base``, ``new``) also lists its ``vms``: ``pid``, ``vm`` (fd),
``vm_gen``, ``name``, ``vmm`` (VMM kind) and ``comm``, null where the trace carries none.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..core.counters import REASONS
from ..core.kvm_abi import vm_fd, vm_gen
from .distribution import Reservoir, Shift, percentile_shift, percentiles
from .profile import ALL, Profile, RingProfile

__all__ = [
    "SCHEMA",
    "DEFAULT_THRESHOLD_PCT",
    "Verdict",
    "Thresholds",
    "metric_key",
    "AnomalyRow",
    "compare_anomalies",
    "MetricRow",
    "Comparison",
    "compare_profiles",
]

SCHEMA = 1  #: version of Comparison.to_dict()
DEFAULT_THRESHOLD_PCT = 10.0
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


class Verdict:
    REGRESSION = "regression"
    IMPROVEMENT = "improvement"
    SAME = "same"


def metric_key(name: str) -> str:
    """A metric's name as a flag key: lower case, runs of other characters as one ``_``
    (``"stall p50"`` -> ``stall_p50``, ``"soft-full exits/10k"`` -> ``soft_full_exits_10k``)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclass(frozen=True)
class Thresholds:
    """Smallest change in percent that gets a verdict: ``default_pct``, or the one given
    for a metric key in ``per_metric``."""

    default_pct: float = DEFAULT_THRESHOLD_PCT
    per_metric: dict[str, float] = field(default_factory=dict)

    def pct(self, name: str) -> float:
        return self.per_metric.get(metric_key(name), self.default_pct)

    def to_dict(self) -> dict[str, Any]:
        return {"default_pct": self.default_pct, "per_metric": dict(self.per_metric)}


@dataclass
class AnomalyRow:
    """One kind of ring anomaly (a stuck reason, or ``overflow``): in how many runs of
    each side it was seen, and the verdict (regression: in NEW only; improvement: in
    BASE only; None: in both)."""

    kind: str
    base_runs: int
    base_of: int
    new_runs: int
    new_of: int
    verdict: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "base_runs": self.base_runs, "base_of": self.base_of,
                "new_runs": self.new_runs, "new_of": self.new_of, "verdict": self.verdict}


def compare_anomalies(base: Sequence[set[str]], new: Sequence[set[str]]) -> list[AnomalyRow]:
    """One row per anomaly kind seen in any run of either side (each side: one set of
    kinds per run), most serious first."""
    kinds = set().union(*base, *new)
    rows = []
    for kind in [*[r for r in REASONS if r in kinds], *sorted(kinds - set(REASONS))]:
        nb = sum(kind in s for s in base)
        nn = sum(kind in s for s in new)
        verdict = (Verdict.REGRESSION if nn and not nb else
                   Verdict.IMPROVEMENT if nb and not nn else None)
        rows.append(AnomalyRow(kind, nb, len(base), nn, len(new), verdict))
    return rows


@dataclass
class MetricRow:
    """One metric of one ring row. ``unit``: "count", "entries", "1/s", "ns", "per 10k"."""

    name: str
    ring: int | str  #: ring index, or "all"
    unit: str
    base: float | None
    new: float | None
    ratio: float | None  #: new / base
    change_pct: float | None  #: 100 * (new - base) / base; inf when base is 0 < new
    verdict: str | None
    significant: bool | None = None  #: percentiles only: the bootstrap's answer

    def to_dict(self) -> dict[str, Any]:
        change = self.change_pct
        return {"name": self.name, "ring": self.ring, "unit": self.unit,
                "base": self.base, "new": self.new, "ratio": self.ratio,
                "change_pct": None if change is None or np.isinf(change) else change,
                "verdict": self.verdict, "significant": self.significant}


@dataclass
class Comparison:
    """Everything ``kvmtrace compare`` reports."""

    base: Profile
    new: Profile
    base_path: str
    new_path: str
    threshold_pct: float
    rows: list[MetricRow] = field(default_factory=list)
    thresholds: Thresholds = field(default_factory=Thresholds)
    anomalies: list[AnomalyRow] = field(default_factory=list)

    @property
    def stalls_comparable(self) -> bool:
        """False when one trace's stalls are measured and the other's derived (then the
        stall percentiles get no verdict)."""
        a, b = self.base.stall_source, self.new.stall_source
        return a is None or b is None or a == b

    @property
    def regressions(self) -> list[MetricRow]:
        return [r for r in self.rows if r.verdict == Verdict.REGRESSION]

    @property
    def improvements(self) -> list[MetricRow]:
        return [r for r in self.rows if r.verdict == Verdict.IMPROVEMENT]

    @property
    def anomaly_regressions(self) -> list[AnomalyRow]:
        return [a for a in self.anomalies if a.verdict == Verdict.REGRESSION]

    @property
    def exit_status(self) -> int:
        """1 when a regression (a metric's or an anomaly's) was found, else 0."""
        return 1 if self.regressions or self.anomaly_regressions else 0

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object (plain JSON types; no NaN or infinity)."""
        return {
            "schema": SCHEMA,
            "base": _side(self.base, self.base_path),
            "new": _side(self.new, self.new_path),
            "threshold_pct": self.threshold_pct,
            "thresholds": self.thresholds.to_dict(),
            "stalls_comparable": self.stalls_comparable,
            "regressions": len(self.regressions) + len(self.anomaly_regressions),
            "improvements": len(self.improvements) + sum(
                a.verdict == Verdict.IMPROVEMENT for a in self.anomalies),
            "metrics": [r.to_dict() for r in self.rows],
            "anomalies": [a.to_dict() for a in self.anomalies],
        }


def _side(p: Profile, path: str) -> dict[str, Any]:
    return {"path": path, "source": p.kind, "events": p.events, "span_ns": p.span_ns,
            "lost": p.lost_events, "stall_source": p.stall_source, "sampled": p.sampled,
            "vms": [{"pid": v.pid, "vm": vm_fd(v.vm), "vm_gen": vm_gen(v.vm), "name": v.name,
                     "vmm": v.vmm, "comm": v.comm or None} for v in p.vms]}


# (name, unit, direction: +1 higher is better, -1 lower is better, 0 none, getter)
_Getter = Callable[[RingProfile, Profile], float | None]
_SCALARS: tuple[tuple[str, str, int, _Getter], ...] = (
    ("pushes", "count", 0, lambda r, p: r.pushes),
    ("push rate", "1/s", +1, lambda r, p: r.push_rate(p.span_ns)),
    ("soft-full exits", "count", 0, lambda r, p: r.soft_full_exits),
    ("soft-full exits/10k", "per 10k", -1, lambda r, p: r.exits_per_10k),
    ("resets", "count", 0, lambda r, p: r.resets),
    ("entries reset", "entries", 0, lambda r, p: r.entries_reset),
    ("entries per reset", "entries", 0, lambda r, p: r.entries_per_reset),
    ("max used", "entries", -1, lambda r, p: r.max_used),
    ("overwritten", "entries", -1, lambda r, p: r.overwritten),
)


def compare_profiles(base: Profile, new: Profile, *, base_path: str = "", new_path: str = "",
                     threshold_pct: float = DEFAULT_THRESHOLD_PCT,
                     thresholds: Thresholds | None = None,
                     base_anomalies: set[str] | None = None,
                     new_anomalies: set[str] | None = None) -> Comparison:
    """Every metric of every ring row of ``base`` and ``new``, with verdicts; and the
    anomalies (stuck reasons, ``overflow``) of each trace, when given."""
    th = thresholds or Thresholds(threshold_pct)
    cmp = Comparison(base, new, base_path, new_path, th.default_pct, thresholds=th)
    cmp.anomalies = compare_anomalies([base_anomalies or set()], [new_anomalies or set()])
    judge_dist = not (base_anomalies or new_anomalies)
    keys = sorted({k for k in (*base.rings, *new.rings) if isinstance(k, int)})
    for key in (*keys, ALL):
        rb, rn = base.rings.get(key), new.rings.get(key)
        for name, unit, sign, get in _SCALARS:
            vb = None if rb is None else get(rb, base)
            vn = None if rn is None else get(rn, new)
            cmp.rows.append(_row(name, key, unit, vb, vn, sign, th.pct(name)))
        cmp.rows += _dist_rows("stall", key, rb and rb.stall_ns, rn and rn.stall_ns,
                               th, judge=cmp.stalls_comparable and judge_dist)
        if key == ALL:
            cmp.rows += _dist_rows("reset latency", key, rb and rb.reset_lat_ns,
                                   rn and rn.reset_lat_ns, th, judge=judge_dist)
    cmp.rows.append(_row("lost events", ALL, "count", base.lost_events, new.lost_events, -1,
                         th.pct("lost events")))
    return cmp


def _dist_rows(what: str, key: int | str, rb: Reservoir | None, rn: Reservoir | None,
               th: Thresholds, judge: bool = True) -> list[MetricRow]:
    """Percentile rows (judged with the bootstrap unless not ``judge``), then max and
    count (no verdict)."""
    nb, nn = (0 if r is None else r.seen for r in (rb, rn))
    if nb == 0 and nn == 0:
        return []
    vb = rb.values if rb is not None and nb else None
    vn = rn.values if rn is not None and nn else None
    qs = [q for _, q in QUANTILES] + [1.0]
    pb = percentiles(vb, qs) if vb is not None else None
    pn = percentiles(vn, qs) if vn is not None else None
    shifts: list[Shift] | None = None
    if vb is not None and vn is not None:
        shifts = percentile_shift(vb, vn, [q for _, q in QUANTILES])
    rows = []
    for i, (label, _) in enumerate(QUANTILES):
        sig = shifts[i].significant if shifts is not None else False
        name = f"{what} {label}"
        rows.append(_row(name, key, "ns", pb and pb[i], pn and pn[i], -1 if judge else 0,
                         th.pct(name), significant=sig))
    rows.append(_row(f"{what} max", key, "ns", pb and pb[-1], pn and pn[-1], 0, 0.0))
    rows.append(_row(f"{what} count", key, "count", nb, nn, 0, 0.0))
    return rows


def _row(name: str, key: int | str, unit: str, base: float | None, new: float | None,
         sign: int, threshold_pct: float, *, significant: bool | None = None) -> MetricRow:
    ratio = change = None
    if base is not None and new is not None:
        if base == new:
            ratio, change = 1.0, 0.0
        elif base:
            ratio = new / base
            change = 100.0 * (new - base) / base
        else:
            change = float("inf") if new > 0 else float("-inf")
    verdict = None
    if sign and change is not None:
        verdict = Verdict.SAME
        if abs(change) > threshold_pct and significant is not False:
            worse = (change > 0) == (sign < 0)
            verdict = Verdict.REGRESSION if worse else Verdict.IMPROVEMENT
    return MetricRow(name, key, unit, base, new, ratio, change, verdict, significant)
