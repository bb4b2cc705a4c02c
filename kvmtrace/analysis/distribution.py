"""Exact value distributions in bounded memory, and a test of whether two differ.

:class:`Reservoir` keeps every value it is fed (ns durations, as numpy ``int64``) until it
holds ``cap`` of them, then keeps a uniform random sample of ``cap`` of all values seen
(reservoir sampling, Vitter's algorithm R, vectorised per batch, fixed seed) and says so
(:attr:`Reservoir.sampled`). Percentiles are values that occurred (``inverted_cdf``: the
smallest value with at least q of the sample at or below it), never bucket bounds.

:func:`percentile_shift` decides whether a percentile moved beyond noise: a bootstrap of the
difference of that percentile between two samples (fixed seed, no scipy); the shift is
significant when the central confidence interval of the difference excludes zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_CAP",
    "MIN_SAMPLES",
    "Reservoir",
    "percentiles",
    "percentile_shift",
]

DEFAULT_CAP = 1_000_000  #: values kept per distribution before sampling starts
MIN_SAMPLES = 5  #: fewer values on either side: never significant
BOOT_ROUNDS = 1000  #: bootstrap resamples
BOOT_CAP = 4000  #: values per side the bootstrap draws from (a seeded subsample above)
SEED = 0x6B7674  #: every random choice here is reproducible


class Reservoir:
    """A uniform sample of at most ``cap`` values of a stream (all of them until full)."""

    def __init__(self, cap: int = DEFAULT_CAP, *, seed: int = SEED) -> None:
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap = cap
        self.seen = 0  #: values fed so far
        self._buf = np.empty(min(cap, 1024), dtype=np.int64)
        self._rng = np.random.default_rng(seed)

    @property
    def sampled(self) -> bool:
        """True once more values were fed than kept."""
        return self.seen > self.cap

    def add(self, values: np.ndarray) -> None:
        """Feed values (any integer dtype; ns fit in int64)."""
        vals = np.asarray(values).astype(np.int64, copy=False)
        n = len(vals)
        if n == 0:
            return
        kept = min(self.seen, self.cap)
        take = min(n, self.cap - kept)
        if take:
            self._grow(kept + take)
            self._buf[kept:kept + take] = vals[:take]
        rest = vals[take:]
        if len(rest):
            # algorithm R: the value numbered i (0-based, over the whole stream) replaces
            # slot j ~ U[0, i] when j < cap; later values win, as in the sequential loop.
            i = self.seen + take + np.arange(len(rest), dtype=np.int64)
            j = (self._rng.random(len(rest)) * (i + 1)).astype(np.int64)
            hit = np.flatnonzero(j < self.cap)
            if len(hit):
                slots = j[hit][::-1]
                _, first = np.unique(slots, return_index=True)  # last write per slot
                self._buf[slots[first]] = rest[hit[::-1][first]]
        self.seen += n

    def _grow(self, need: int) -> None:
        if need > len(self._buf):
            size = min(self.cap, max(need, 2 * len(self._buf)))
            buf = np.empty(size, dtype=np.int64)
            buf[:len(self._buf)] = self._buf
            self._buf = buf

    @property
    def values(self) -> np.ndarray:
        """The kept values (a view; all values when not :attr:`sampled`)."""
        return self._buf[:min(self.seen, self.cap)]


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
