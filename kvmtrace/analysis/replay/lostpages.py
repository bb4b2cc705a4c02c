"""Lost dirty pages of one ring for the fast replay: which (slot, offset) pages had an entry
overwritten or stranded (``struct kvm_dirty_gfn`` never collected by a reset) and no later
push of theirs collected.

A push's entry is collected in ring-index order, so a later push of the same page is
always collected after an earlier one's loss is known (the loss is found when an
overflowing push lands on it, before any reset walk can pass that index): keeping, per
lost page, the newest lost push and the newest collected one decides it. Entries are
identified by the ring's push count (``seq``). State: one dict entry per lost page.
"""

from __future__ import annotations

import numpy as np

from ...core.kvm_abi import UNKNOWN_SLOT

__all__ = ["LostPages"]


class LostPages:
    def __init__(self) -> None:
        #: (slot, offset) -> [entries lost, newest lost seq, newest collected seq]
        self.pages: dict[tuple[int, int], list[int]] = {}
        self._offs: np.ndarray | None = None

    def __bool__(self) -> bool:
        return bool(self.pages)

    def lost(self, s: np.ndarray, o: np.ndarray, seq: np.ndarray) -> None:
        """Entries (slot u32, offset u64, push seq i64) overwritten or stranded."""
        pages = self.pages
        for a, b, q in zip(s.tolist(), o.tolist(), seq.tolist(), strict=True):
            if a == UNKNOWN_SLOT:
                continue
            p = pages.get((a, b))
            if p is None:
                pages[(a, b)] = [1, q, -1]
                self._offs = None
            else:
                p[0] += 1
                p[1] = max(p[1], q)

    def collected(self, s: np.ndarray, o: np.ndarray, seq: np.ndarray) -> None:
        """Entries a reset collected (only pages lost before matter)."""
        if not self.pages or not len(o):
            return
        if self._offs is None:
            self._offs = np.unique(np.array([b for _, b in self.pages], dtype=np.uint64))
        hit = np.flatnonzero(np.isin(o, self._offs))
        for i in hit.tolist():
            p = self.pages.get((int(s[i]), int(o[i])))
            if p is not None:
                p[2] = max(p[2], int(seq[i]))

    def result(self, cap: int) -> tuple[list[tuple[int, int, int]], int]:
        """Sorted (slot, offset, entries lost) of the pages still lost; their count."""
        out = sorted((a, b, p[0]) for (a, b), p in self.pages.items() if p[1] > p[2])
        return out[:cap], len(out)
