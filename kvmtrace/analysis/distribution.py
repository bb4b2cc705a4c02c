"""Exact value distributions in bounded memory, and a test of whether two differ.

:class:`Reservoir` keeps every value it is fed (ns durations, as numpy ``int64``) until it
holds ``cap`` of them, then keeps a uniform random sample of ``cap`` of all values seen
(reservoir sampling, Vitter's algorithm R, vectorised per batch, fixed seed) and says so
(:attr:`Reservoir.sampled`); it lives in :mod:`kvmtrace.model.reservoir`, a floor down, so
the replay's :class:`~kvmtrace.model.results.Durations` keeps exact values too.
Percentiles are values that occurred (``inverted_cdf``: the smallest value with at least q
of the sample at or below it), never bucket bounds.

:func:`percentile_shift` decides whether a percentile moved beyond noise: a bootstrap of the
difference of that percentile between two samples (fixed seed, no scipy); the shift is
significant when the central confidence interval of the difference excludes zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..model.reservoir import DEFAULT_CAP, SEED, Reservoir

__all__ = [
    "DEFAULT_CAP",
    "MIN_SAMPLES",
    "Reservoir",
    "percentiles",
    "percentile_shift",
]

MIN_SAMPLES = 5  #: fewer values on either side: never significant
BOOT_ROUNDS = 1000  #: bootstrap resamples
BOOT_CAP = 4000  #: values per side the bootstrap draws from (a seeded subsample above)


def percentiles(values: np.ndarray, qs: Sequence[float]) -> list[int] | None:
    """The q-quantiles (0..1) of ``values`` as observed values; None when empty."""
    if len(values) == 0:
        return None
    return [int(v) for v in np.quantile(values, list(qs), method="inverted_cdf")]


@dataclass(frozen=True)
class Shift:
    """The bootstrap interval of ``new - base`` of one percentile, in the values' unit."""

    low: float
    high: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def percentile_shift(base: np.ndarray, new: np.ndarray, qs: Sequence[float], *,
                     confidence: float = 0.95, rounds: int = BOOT_ROUNDS,
                     seed: int = SEED) -> list[Shift] | None:
    """Bootstrap interval of (new q-quantile - base q-quantile) for each q; None when either
    side has fewer than :data:`MIN_SAMPLES` values (nothing can be significant then).

    Each side is resampled with replacement ``rounds`` times (from a seeded subsample of
    :data:`BOOT_CAP` values when larger, which only widens the interval), independently.
    """
    if len(base) < MIN_SAMPLES or len(new) < MIN_SAMPLES:
        return None
    rng = np.random.default_rng(seed)
    q = list(qs)
    diffs = _boot(new, q, rounds, rng) - _boot(base, q, rounds, rng)  # (len(q), rounds)
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(diffs, [tail, 1.0 - tail], axis=1, method="inverted_cdf")
    return [Shift(float(a), float(b)) for a, b in zip(lo, hi, strict=True)]


def _boot(values: np.ndarray, qs: list[float], rounds: int,
          rng: np.random.Generator) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) > BOOT_CAP:
        v = rng.choice(v, BOOT_CAP, replace=False)
    draws = v[rng.integers(0, len(v), size=(rounds, len(v)))]
    return np.quantile(draws, qs, axis=1, method="inverted_cdf")
