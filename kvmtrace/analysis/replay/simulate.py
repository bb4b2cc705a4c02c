"""What-if: the soft-full exits the same push stream would cause with another ring size.

Model (printed with the result, so nobody has to guess):

1. the guest dirties the same pages in the same order and at the same times (the time a
   vCPU would spend stalled in the extra exits is not added);
2. a simulated ring of N entries exits as soon as a push makes its used count reach the
   soft limit N - reserve (the kernel exits at the vCPU's next guest entry, which the
   trace cannot tell; real guests may push a few more entries first);
3. on a simulated exit the VMM harvests every ring of that VM and resets them all
   (KVM_RESET_DIRTY_RINGS), so every ring of the VM restarts from used = 0;
4. a reset seen in the trace leaves on the simulated ring only the entries the real reset
   left (``min(simulated used, dirty_index - reset_index)`` of the reset event);
5. each simulated exit stalls the vCPU for the mean stall observed in the trace for that
   VM (KT_STALL events, else soft-full exit to the ring's next push); no estimate when the
   trace has no exit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...core.events import Kind
from ...core.kvm_abi import KVM_DIRTY_RING_RSVD_ENTRIES, U32_MASK
from ...model.results import RingId

__all__ = ["RingSizeSim", "SimResult", "ASSUMPTIONS"]

ASSUMPTIONS = (
    "same pushes at the same times (stall time of extra exits not added)",
    "a ring exits as soon as a push brings used to the soft limit (N - reserve)",
    "on a simulated exit the VMM harvests and resets every ring of that VM",
    "a traced reset leaves min(simulated used, the reset's own used) entries",
    "each simulated exit stalls for the trace's mean stall of that VM",
)



@dataclass
class SimResult:
    entries: int
    soft_limit: int
    exits: dict[RingId, int] = field(default_factory=dict)
    stall_ns: dict[RingId, float | None] = field(default_factory=dict)  # estimated totals
    assumptions: tuple[str, ...] = ASSUMPTIONS

    @property
    def total_exits(self) -> int:
        return sum(self.exits.values())


class RingSizeSim:
    """Feed EVENT_DTYPE batches in time order; only pushes and resets are used."""

    def __init__(self, entries: int, reserved: int = KVM_DIRTY_RING_RSVD_ENTRIES) -> None:
        if entries <= reserved or entries & (entries - 1):
            raise ValueError(f"simulated ring must be a power of two above {reserved}")
        self.entries = entries
        self.limit = entries - reserved
        self.used: dict[tuple[int, int], dict[int, int]] = {}
        self.exits: dict[RingId, int] = {}

    def feed(self, ev: np.ndarray) -> None:
        kind = ev["kind"]
        sel = np.flatnonzero((kind == Kind.PUSH) | (kind == Kind.RESET))
        if not len(sel):
            return
        e = ev[sel]
        pid, vm = e["pid"], e["vm"]
        if pid.min() == pid.max() and vm.min() == vm.max():
            self._feed_vm((int(pid[0]), int(vm[0])), e)
            return
        keys = np.stack([pid.astype(np.int64), vm.astype(np.int64)], axis=1)
        uk, inv = np.unique(keys, axis=0, return_inverse=True)
        for g, (p, v) in enumerate(uk.tolist()):
            self._feed_vm((p, v), e[inv.ravel() == g])

    def _feed_vm(self, vmkey: tuple[int, int], e: np.ndarray) -> None:
        used = self.used.setdefault(vmkey, {})
        ring = e["ring"].astype(np.int64)
        is_reset = e["kind"] == Kind.RESET
        rpos = np.flatnonzero(is_reset)
        resid = ((e["dirty_index"].astype(np.int64) - e["reset_index"]) & U32_MASK)
        n, pos = len(e), 0
        rings_here = np.unique(ring).tolist()
        for r in rings_here:
            used.setdefault(r, 0)
        while pos < n:
            q = int(np.searchsorted(rpos, pos))
            nr = int(rpos[q]) if q < len(rpos) else n
            seg = ring[pos:nr]
            best = -1
            if len(seg):
                cands = [int(seg[0])] if (seg == seg[0]).all() else np.unique(seg).tolist()
                for r in cands:
                    need = max(1, self.limit - used[r])
                    p = np.flatnonzero(seg == r)
                    if len(p) >= need:
                        cand = int(p[need - 1])
                        best = cand if best < 0 else min(best, cand)
            if best >= 0:
                r = int(seg[best])
                key = (*vmkey, r)
                self.exits[key] = self.exits.get(key, 0) + 1
                for k in used:
                    used[k] = 0
                pos += best + 1
                continue
            if len(seg):
                rs, cnt = np.unique(seg, return_counts=True)
                for r, c in zip(rs.tolist(), cnt.tolist(), strict=True):
                    used[r] += c
            if nr < n:
                r = int(ring[nr])
                used[r] = min(used.get(r, 0), int(resid[nr]) if resid[nr] < 1 << 31 else 0)
            pos = nr + 1

    def finish(self, rings: list[RingId], mean_stall: dict[tuple[int, int], float | None]
               ) -> SimResult:
        out = SimResult(self.entries, self.limit)
        for key in rings:
            n = self.exits.get(key, 0)
            out.exits[key] = n
            m = mean_stall.get(key[:2])
            out.stall_ns[key] = None if m is None else n * m
        return out
