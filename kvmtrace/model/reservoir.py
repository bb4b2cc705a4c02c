"""A uniform sample of a stream of integer values in bounded memory: :class:`Reservoir`.

It keeps every value it is fed (ns durations, as numpy ``int64``) until it holds ``cap`` of
them, then keeps a uniform random sample of ``cap`` of all values seen (reservoir sampling,
Vitter's algorithm R, vectorised per batch, fixed seed) and says so
(:attr:`Reservoir.sampled`). Used by the replay's
:class:`~kvmtrace.model.results.Durations` and by
:mod:`kvmtrace.analysis.distribution` (which re-exports it).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_CAP", "SEED", "Reservoir"]

DEFAULT_CAP = 1_000_000  #: values kept per distribution before sampling starts
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
