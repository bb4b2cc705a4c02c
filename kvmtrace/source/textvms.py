"""VM identity for text traces: tell apart the rings of several VMs whose events the text
prints with the same ring index (tracefs and ``perf script`` text carry no VM fd).

What the text does carry (Linux 6.x, virt/kvm/dirty_ring.c):

- a push (``kvm_dirty_ring_push``) and a soft-full exit run on the vCPU's own thread, so
  the printed thread id and the ring index name a *push ring* (pid, tid, index); a vCPU
  thread runs one vCPU, as in QEMU and kvmtrace's VMM. A push ring whose first push
  continues another push ring of the same index (``dirty_index`` one past its last, the
  other one finished) is the same ring on a new thread.
- a reset (``kvm_dirty_ring_reset``) runs on whichever thread called
  KVM_RESET_DIRTY_RINGS. One call on one VM prints one reset per ring in vCPU index order
  (kvm_for_each_vcpu), so a run of one thread's resets with rising indices is one call on
  one VM (a *burst*).

A reset of ring index i with ``dirty_index`` D and ``reset_index`` R (both read after the
reset loop) *fits* a push ring c of index i only if (exact index continuity, no
timestamps): c reached D (D is c's index before its first push or one of its pushes), the
push that made ``dirty_index`` D read a ``reset_index`` <= R, the next push (D + 1, after
the reset read D) read one >= R, and the resets already given to c before (after) it have
D' <= D and R' <= R (>=). A VM holds one ring per index. The solver, in time order:

1. a reset that fits one ring only is that ring's; the other resets of its burst go to
   the one ring of their index in the same VM (one call is one VM);
2. for a burst still open, its VM is, in turn: the VM of a reset of it placed in step 1
   or fitting one ring only, the VM its thread works for (the VM of the thread's other
   bursts, or of its own pushes: a vCPU thread resets its own VM) when every reset fits
   a ring there; without one, a burst that moves no ring it fits (D and R equal to
   that ring's previous reset) changes nothing whichever VM it was: it is *unplaced*,
   counted under vm -1 (:attr:`TextVms.unplaced`);
3. each open reset then takes the one candidate in the burst's VM; else (no VM named
   yet) among the candidates it moves, the one whose pushes are in time with the reset
   (push D traced before it, push D + 1 after it); a tie left there is broken by order
   and its rings are *unsure* (:attr:`TextVms.unsure`; all of the burst's when the tie
   named the VM), unless another burst has the same indices (then either order gives
   the same rings).

:attr:`TextVms.warnings` says in one line when resets were unplaced or rings unsure. A
reset that fits no push ring belongs to a ring that never pushed; it goes to its burst's
VM.

VMs found this way get synthetic ids ``vm = -2, -3, ...`` (in order of their first event;
real VM fds are >= 0 and -1 means unknown, so they cannot collide). Separation happens
only where the text needs it: the rings of a process (of the whole text when it prints no
pid) in which every ring index is pushed by one thread keep ``vm`` -1, as before.

The solver needs the whole trace (a reset's ring is known once later pushes are seen), so
a text source runs it over the file first (:meth:`TextVms.observe` per chunk, then
:meth:`TextVms.solve`) and assigns ids on a second read (:meth:`TextVms.assign`). Memory:
per push, 16 bytes (its position and timestamp), per reset 48 bytes, while solving.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from ..core.events import Kind
from ..core.kvm_abi import U32_MASK, VM_UNKNOWN, s32

__all__ = ["TextVms", "SYNTHETIC_VM_FIRST"]

SYNTHETIC_VM_FIRST = -2  #: the first synthetic VM id; the next ones count down


@dataclass
class _PushRing:
    """Pushes of one (pid, tid, ring index); positions count pushes from ``base``
    (``dirty_index`` before the ring's first push here)."""

    pid: int
    tid: int
    idx: int
    base: int
    first_ts: int
    last_pos: int = 0
    last_ts: int = 0
    cp_pos: list[int] = field(default_factory=list)  # positions where reset_index changed
    cp_ri: list[int] = field(default_factory=list)
    ts_parts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # pos, ts
    # solver state: resets taken so far, by their number in the trace: (number, D, R)
    taken: list[tuple[int, int, int]] = field(default_factory=list)
    push_pos: np.ndarray | None = None  # every push: position, ts (ns)
    push_ts: np.ndarray | None = None

    def ri_at(self, pos: int) -> int:
        """reset_index the push at position ``pos`` (1..last_pos) read."""
        k = bisect.bisect_right(self.cp_pos, pos) - 1
        return self.cp_ri[max(k, 0)]

    def neighbours(self, i: int) -> tuple[tuple[int, int, int] | None,
                                          tuple[int, int, int] | None]:
        """The resets taken before and after reset number ``i``."""
        k = bisect.bisect_left(self.taken, (i, -1, -1))
        return (self.taken[k - 1] if k else None,
                self.taken[k] if k < len(self.taken) else None)

    def fits(self, i: int, d: int, r: int) -> bool:
        """Could reset number ``i`` (dirty_index ``d``, reset_index ``r``) be this ring's?"""
        pos = s32(d - self.base)
        if pos < 0 or pos > self.last_pos:
            return False
        before, after = self.neighbours(i)
        if before is not None and (s32(d - before[1]) < 0 or s32(r - before[2]) < 0):
            return False
        if after is not None and (s32(after[1] - d) < 0 or s32(after[2] - r) < 0):
            return False
        if pos >= 1 and s32(r - self.ri_at(pos)) < 0:
            return False
        return not (pos < self.last_pos and s32(self.ri_at(pos + 1) - r) < 0)

    def lateness(self, ts: int, d: int) -> int:
        """ns by which this ring's pushes contradict a reset at ``ts`` that read
        dirty_index ``d``: push D traced after the reset, push D + 1 before it."""
        assert self.push_pos is not None and self.push_ts is not None
        pos = s32(d - self.base)
        k = int(np.searchsorted(self.push_pos, pos))
        late = 0
        if pos >= 1 and k < len(self.push_pos) and self.push_pos[k] == pos:
            late += max(0, int(self.push_ts[k]) - ts)
        k1 = k + 1 if k < len(self.push_pos) and self.push_pos[k] == pos else k
        if k1 < len(self.push_pos) and self.push_pos[k1] == pos + 1:
            late += max(0, ts - int(self.push_ts[k1]))
        return late

    def moves(self, i: int, d: int, r: int) -> bool:
        """Would reset number ``i`` move this ring (D or R past its previous reset's)?"""
        before, _ = self.neighbours(i)
        return before is None or (d, r) != (before[1], before[2])


def _pack(pid, tid, ring):  # type: ignore[no-untyped-def]
    """One u64 per (pid, tid, ring index): 22 + 22 + 20 bits (pid_max is 2**22)."""
    return ((np.asarray(pid).astype(np.uint64) << np.uint64(42))
            | (np.asarray(tid).astype(np.uint64) << np.uint64(20))
            | (np.asarray(ring).astype(np.int64).astype(np.uint64) & np.uint64(0xFFFFF)))


class _Union:
    """VMs as sets of push rings; a VM holds one ring per (pid, ring index)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.keys: dict[int, set[tuple[int, int]]] = {}  # root -> (pid, index) of its rings

    def add(self, key: tuple[int, int]) -> int:
        self.parent.append(len(self.parent))
        self.keys[len(self.parent) - 1] = {key}
        return len(self.parent) - 1

    def can_join(self, a: int, b: int) -> bool:
        """One VM could hold both groups: no ring index in both (or already one)."""
        ra, rb = self.find(a), self.find(b)
        return ra == rb or not (self.keys[ra] & self.keys[rb])

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo
            self.keys[lo] |= self.keys.pop(hi)


class TextVms:
    """Collects a text trace's pushes and resets, solves which ring each reset is, and
    sets ``vm`` on the events of a second read (see the module docstring)."""

    def __init__(self) -> None:
        self._rings: list[_PushRing] = []
        self._key: dict[tuple[int, int, int], int] = {}
        self._resets: list[np.ndarray] = []  # per chunk: ts, pid, tid, ring, di, ri
        self.needed = False  #: some ring index of a process is pushed by several threads
        self._sep_pids: set[int] = set()
        self.warnings: list[str] = []
        #: (pid, vm, index) of rings whose resets could not be told apart from another's
        self.unsure: set[tuple[int, int, int]] = set()
        self._reset_vm: np.ndarray = np.zeros(0, np.int64)
        self._ring_vm: dict[int, int] = {}
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None
        self._unsure: set[int] = set()  # push rings whose resets were not told apart
        self.unplaced = 0  #: resets that changed no ring and fit rings of several VMs

    # -- pass 1 ------------------------------------------------------------------------
    def observe(self, ev: np.ndarray) -> None:
        """One chunk of events in the order the source yields them."""
        kind = ev["kind"]
        pushes = ev[kind == Kind.PUSH]
        if len(pushes):
            self._observe_pushes(pushes)
        resets = ev[kind == Kind.RESET]
        if len(resets):
            self._resets.append(np.stack([
                resets["ts"].astype(np.int64), resets["pid"].astype(np.int64),
                resets["tid"].astype(np.int64), resets["ring"].astype(np.int64),
                resets["dirty_index"].astype(np.int64),
                resets["reset_index"].astype(np.int64)], 1))

    def _observe_pushes(self, p: np.ndarray) -> None:
        key = _pack(p["pid"], p["tid"], p["ring"])
        uniq, inv = np.unique(key, return_inverse=True)
        inv = inv.ravel()
        order = np.argsort(inv, kind="stable")
        cuts = np.searchsorted(inv[order], np.arange(len(uniq) + 1))
        di_all = p["dirty_index"].astype(np.int64)
        ri_all = p["reset_index"].astype(np.int64)
        ts_all = p["ts"].astype(np.int64)
        for u in range(len(uniq)):
            sel = order[cuts[u]:cuts[u + 1]]
            e0 = p[sel[0]]
            k = (int(e0["pid"]), int(e0["tid"]), int(e0["ring"]))
            h = self._key.get(k)
            di, ri, ts = di_all[sel], ri_all[sel], ts_all[sel]
            if h is None:
                h = self._key[k] = len(self._rings)
                self._rings.append(_PushRing(k[0], k[1], k[2], (int(di[0]) - 1) & U32_MASK,
                                             int(ts[0])))
            r = self._rings[h]
            pos = ((di - r.base) & U32_MASK)
            prev = r.cp_ri[-1] if r.cp_ri else None
            change = np.ones(len(ri), bool)
            change[1:] = ri[1:] != ri[:-1]
            if prev is not None:
                change[0] = int(ri[0]) != prev
            r.cp_pos.extend(pos[change].tolist())
            r.cp_ri.extend(ri[change].tolist())
            r.last_pos = max(r.last_pos, int(pos.max()))
            r.ts_parts.append((pos, ts))
            r.last_ts = int(ts[-1])

    # -- solving -----------------------------------------------------------------------
    def solve(self) -> None:
        """Decide which ring each reset is and number the VMs."""
        rings = self._rings
        uf = _Union()
        for r in rings:
            uf.add((r.pid, r.idx))
        by_index: dict[tuple[int, int], list[int]] = {}
        for h, r in enumerate(rings):
            r.push_pos = np.concatenate([p for p, _ in r.ts_parts])
            r.push_ts = np.concatenate([t for _, t in r.ts_parts])
            r.ts_parts = []
            by_index.setdefault((r.pid, r.idx), []).append(h)
        self._chain(by_index, uf)
        groups = {key: {uf.find(h) for h in hs} for key, hs in by_index.items()}
        self._sep_pids = {pid for (pid, _), g in groups.items() if len(g) > 1}
        self.needed = bool(self._sep_pids)
        res = (np.concatenate(self._resets) if self._resets
               else np.zeros((0, 6), np.int64))
        self._resets = []
        n = len(res)
        if not self.needed:
            return
        cand = self._candidates(res, by_index)  # filled lazily, in time order
        assigned = np.full(n, -1, np.int64)
        bursts = self._bursts(res)
        for burst in bursts:
            self._solve_burst(burst, res, cand, assigned, uf)
        tid_groups: dict[tuple[int, int], set[int]] = {}
        for h, r in enumerate(rings):  # a vCPU thread that resets resets its own VM
            tid_groups.setdefault((r.pid, r.tid), set()).add(h)
        twins: dict[tuple, list[int]] = {}
        for burst in bursts:
            key = (int(res[burst[0], 1]), int(res[burst[0], 2]))
            tid_groups.setdefault(key, set()).update(
                int(assigned[i]) for i in burst if assigned[i] >= 0)
            if any(assigned[i] < 0 for i in burst):
                content = tuple((int(res[i, 3]), int(res[i, 4]), int(res[i, 5]))
                                for i in burst)
                twins.setdefault(content, []).append(burst[0])
        # second round, in time order: bursts with resets that fit several rings
        unsure_rings = self._unsure
        for burst in bursts:
            if all(assigned[i] >= 0 for i in burst):
                continue
            key = (int(res[burst[0], 1]), int(res[burst[0], 2]))
            roots = {uf.find(h) for h in tid_groups.get(key, set())}
            prefer = roots.pop() if len(roots) == 1 else None
            self._final_burst(burst, res, cand, assigned, uf, prefer, twins, unsure_rings)
        self._number(res, assigned, bursts, uf, unsure_rings)

    def _chain(self, by_index: dict[tuple[int, int], list[int]], uf: _Union) -> None:
        """Join a push ring that continues another (a vCPU moved to a new thread)."""
        for hs in by_index.values():
            if len(hs) < 2:
                continue
            hs = sorted(hs, key=lambda h: self._rings[h].first_ts)
            for j, h in enumerate(hs[1:], 1):
                r = self._rings[h]
                for g in hs[:j]:
                    o = self._rings[g]
                    if (o.last_ts <= r.first_ts and r.base == (o.base + o.last_pos) & U32_MASK
                            and s32(r.cp_ri[0] - o.cp_ri[-1]) >= 0):
                        uf.union(g, h)
                        break

    def _candidates(self, res: np.ndarray, by_index: dict[tuple[int, int], list[int]]):
        """cand(i): push rings reset i fits, given the resets assigned so far."""
        def cand(i: int) -> list[int]:
            pid, idx, d, r = (int(res[i, 1]), int(res[i, 3]), int(res[i, 4]),
                              int(res[i, 5]))
            hs = by_index.get((pid, idx), [])
            if pid == 0:  # tgid not printed: any process
                hs = [h for (p, x), v in by_index.items() if x == idx for h in v]
            return [h for h in hs if self._rings[h].fits(i, d, r)]
        return cand

    @staticmethod
    def _bursts(res: np.ndarray) -> list[list[int]]:
        """Resets of one KVM_RESET_DIRTY_RINGS call: per thread, runs of rising index."""
        out: list[list[int]] = []
        open_: dict[tuple[int, int], tuple[int, int]] = {}  # thread -> (burst, last index)
        for i in range(len(res)):
            key = (int(res[i, 1]), int(res[i, 2]))
            idx = int(res[i, 3])
            cur = open_.get(key)
            if cur is None or idx <= cur[1]:
                out.append([i])
                open_[key] = (len(out) - 1, idx)
            else:
                out[cur[0]].append(i)
                open_[key] = (cur[0], idx)
        return out

    def _solve_burst(self, burst: list[int], res: np.ndarray, cand, assigned: np.ndarray,
                     uf: _Union) -> None:
        """First round: resets that fit one ring, then the rest of the burst in that
        ring's VM (one call is one VM)."""
        todo = [i for i in burst if assigned[i] < 0]
        cs = {i: cand(i) for i in todo}
        for i in todo:
            if len(cs[i]) == 1:
                self._take(i, cs[i][0], res, assigned)
        roots = {uf.find(int(assigned[i])) for i in burst if assigned[i] >= 0}
        if len(roots) > 1:  # resets of one call that fit one ring each: one VM
            first = roots.pop()
            for g in roots:
                if uf.can_join(first, g):
                    uf.union(first, g)
                else:  # two rings of one index in one call: the indices contradict
                    self._unsure.update(int(assigned[i]) for i in burst if assigned[i] >= 0)
        if not roots and not any(assigned[i] >= 0 for i in burst):
            return
        root = uf.find(next(int(assigned[i]) for i in burst if assigned[i] >= 0))
        for i in todo:
            if assigned[i] < 0:
                pick = [h for h in cand(i) if uf.find(h) == root]
                if len(pick) == 1:
                    self._take(i, pick[0], res, assigned)

    def _final_burst(self, burst: list[int], res: np.ndarray, cand, assigned: np.ndarray,
                     uf: _Union, prefer: int | None, twins: dict[tuple, list[int]],
                     unsure: set[int]) -> None:
        """Second round for a burst with resets that fit several rings. Its VM is the
        one of its resets already placed or fitting one ring only, else the one its
        thread works for (the VM it resets otherwise, or pushes to) when every reset
        fits a ring there. Without either, a burst that moves no candidate stays
        unplaced (vm -1). Then each reset takes, facts first, the one candidate in the
        burst's VM, or the only one left; else, among those it moves (D or R past the
        ring's previous reset), the one whose pushes are in time with the reset (push D
        traced before it, push D + 1 after it), else the first. The rings taken are one
        VM. A reset decided by a tie marks its candidates unsure (all of the burst's,
        when the tie named the VM), unless another burst has the same indices (then
        either order gives the same rings)."""
        todo = [i for i in burst if assigned[i] < 0 and cand(i)]
        if not todo:
            return
        fixed = [int(assigned[i]) for i in burst if assigned[i] >= 0]
        root = fixed[0] if fixed else None
        if root is None:  # a reset that fits one ring only names the VM
            root = next((cand(i)[0] for i in todo if len(cand(i)) == 1), None)
        if root is None and prefer is not None and all(  # the VM its thread works for
                any(uf.find(h) == uf.find(prefer) for h in cand(i)) for i in todo):
            root = prefer
        if root is None and not any(
                self._rings[h].moves(i, int(res[i, 4]), int(res[i, 5]))
                for i in todo for h in cand(i)):
            self.unplaced += len(todo)  # it changed no ring: whichever VM it was, nothing
            return  # else follows from it; counted under vm -1
        content = tuple((int(res[i, 3]), int(res[i, 4]), int(res[i, 5])) for i in burst)
        twin = any(b != burst[0] for b in twins.get(content, []))
        taken = list(fixed)

        def choose(i: int, guess: bool) -> tuple[int | None, list[int]]:
            """The ring for reset i and the candidates it was not told from; without
            ``guess`` only a ring the indices leave alone (else None)."""
            cs = cand(i)
            if root is not None:
                mine = [h for h in cs if uf.find(h) == uf.find(root)]
                if len(mine) == 1:
                    return mine[0], []
                cs = mine or [h for h in cs if uf.can_join(h, root)] or cs
            if len(cs) == 1:
                return cs[0], []
            if not guess:
                return None, cs
            d = int(res[i, 4])
            moving = [h for h in cs if self._rings[h].moves(i, d, int(res[i, 5]))]
            cs = moving or cs  # a call repeated on a ring already there is the other's
            late = {h: self._rings[h].lateness(int(res[i, 0]), d) for h in cs}
            best = min(late.values())
            top = [h for h in cs if late[h] == best]
            return top[0], (top if len(top) > 1 else [])

        pending = [i for i in todo if cand(i)]
        guessed = False  # the burst's VM came from a tie broken arbitrarily
        while pending:  # facts first (a reset that fits one ring names the VM), then
            done = None
            for guess in (False, True):  # one heuristic step, then facts again
                tried = [(i, *choose(i, guess)) for i in pending]
                done = next((t for t in tried if t[1] is not None and not t[2]), None)
                if done is None and guess:  # only ties left: break one by order
                    done = tried[0]
                if done is not None:
                    break
            assert done is not None
            i, h, ties = done
            assert h is not None
            if ties and root is None:
                guessed = True
            # twins make a tie harmless only between rings in the same state
            alike = twin and len({self._rings[g].neighbours(i)[0] and
                                  self._rings[g].neighbours(i)[0][1:] for g in ties}) <= 1
            self._take(i, h, res, assigned)
            taken.append(h)
            root = h if root is None else root
            pending.remove(i)
            if (ties or guessed) and not alike:
                unsure.update(cand(i) if guessed else ties)
        for h in taken[1:]:
            if uf.can_join(taken[0], h):
                uf.union(taken[0], h)
            else:
                unsure.update(taken)

    def _take(self, i: int, h: int, res: np.ndarray, assigned: np.ndarray) -> None:
        assigned[i] = h
        bisect.insort(self._rings[h].taken, (i, int(res[i, 4]), int(res[i, 5])))

    def _number(self, res: np.ndarray, assigned: np.ndarray, bursts: list[list[int]],
                uf: _Union, unsure_rings: set[int]) -> None:
        """Synthetic VM ids in order of first event; resets of rings that never pushed go
        to their burst's VM."""
        first: dict[int, int] = {}
        for h, r in enumerate(self._rings):
            if r.pid in self._sep_pids:  # other processes keep vm -1
                g = uf.find(h)
                first[g] = min(first.get(g, r.first_ts), r.first_ts)
        vm_of = {g: SYNTHETIC_VM_FIRST - k
                 for k, g in enumerate(sorted(first, key=lambda g: (first[g], g)))}
        self._ring_vm = {h: vm_of.get(uf.find(h), VM_UNKNOWN)
                         for h in range(len(self._rings))}
        reset_vm = np.full(len(res), VM_UNKNOWN, np.int64)
        for burst in bursts:
            owned = [int(assigned[i]) for i in burst if assigned[i] >= 0]
            vm = self._ring_vm[owned[0]] if owned else VM_UNKNOWN
            for i in burst:
                reset_vm[i] = self._ring_vm[int(assigned[i])] if assigned[i] >= 0 else vm
        self._reset_vm = reset_vm
        if self.unplaced:
            self.warnings.append(
                f"{self.unplaced} reset event(s) that changed no ring could be any of "
                "several VMs' (the text cannot tell): counted under vm -1")
        for h in sorted(unsure_rings):
            r = self._rings[h]
            self.unsure.add((r.pid, self._ring_vm[h], r.idx))
        if self.unsure:
            names = ", ".join(f"ring {i} of vm {v}" for _, v, i in sorted(self.unsure)[:6])
            self.warnings.append(
                f"the text cannot tell some resets apart ({names}"
                f"{' and more' if len(self.unsure) > 6 else ''}): their rings' anomalies "
                "are not reported")

    # -- pass 2 ------------------------------------------------------------------------
    def assign(self, ev: np.ndarray, first_reset: int) -> int:
        """Set ``vm`` of one chunk's events (in place); ``first_reset``: resets before
        this chunk. Returns the resets in it."""
        kind = ev["kind"]
        is_reset = kind == Kind.RESET
        nres = int(is_reset.sum())
        if not self.needed:
            return nres
        if nres:
            ev["vm"][is_reset] = self._reset_vm[first_reset:first_reset + nres]
        other = np.flatnonzero(~is_reset)
        if not len(other):
            return nres
        if self._lookup is None:
            keys = np.array([_pack(r.pid, r.tid, r.idx) for r in self._rings], np.uint64)
            order = np.argsort(keys)
            self._lookup = (keys[order], np.array(
                [self._ring_vm[int(h)] for h in order], np.int64))
        keys, vms = self._lookup
        want = _pack(ev["pid"][other], ev["tid"][other], ev["ring"][other])
        at = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
        hit = keys[at] == want if len(keys) else np.zeros(len(want), bool)
        out = np.where(hit, vms[at] if len(keys) else VM_UNKNOWN, VM_UNKNOWN)
        if not hit.all():  # an exit of a thread with no push of that index: its thread's VM
            tid_vm = {(r.pid, r.tid): self._ring_vm[h] for h, r in enumerate(self._rings)}
            for j in np.flatnonzero(~hit).tolist():
                out[j] = tid_vm.get((int(ev["pid"][other[j]]), int(ev["tid"][other[j]])),
                                    VM_UNKNOWN)
        ev["vm"][other] = out
        return nres
