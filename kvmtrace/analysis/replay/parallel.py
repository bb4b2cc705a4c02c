"""Replay on every core: the rings of a source with blocks (a recording) spread over
worker processes, their results merged into the one-core report, exactly.

Why this shape. Rings (``struct kvm_dirty_ring``) are independent in the replay but for
two things: a VM's ring size inferred from its first soft-full exit reads every ring of
the VM (:meth:`~kvmtrace.model.sizes.RingSizes.infer`), and a RING_SIZE event drains and
resizes the VM's rings. So the unit of work is a ring when the source's meta gives the
VM's size (the recorder saw KVM_ENABLE_CAP) or the VM has no soft-full exit, else the
whole VM; RING_SIZE events go to every worker. A worker's replay (:class:`~.engine.Replay`
with ``owns``) is then exactly the one-core replay of its rings.

Blocks are not copied through pipes: worker ``w`` decodes blocks ``w, w + N, ...``
(:data:`AHEAD` rounds ahead of the block it replays), copies each block's columns once
into its shared-memory arena (:mod:`.blockshm`) and sends the others where they are (a
few hundred bytes through a pipe). Each worker replays its own rings over every block in
order, reading the others' blocks in place: a worker splits only its own rings'
events out of a block (:func:`~.colfeed.ring_columns`), and each block is decoded once.
A worker marks how far it is done with the others' blocks (its replay holds none of their
bytes once its pending columns are flushed), and a writer reuses a block's bytes after
every reader is done with it.

The units are planned from the blocks' group tables (read without decoding,
:meth:`~kvmtrace.core.sources.EventSource.group_tables`), weighted by the blocks each
appears in, and dealt largest first to the least loaded worker. What else reads the blocks
(a :class:`SharedTap`, e.g. the migration analysis's) is fed by the worker that decodes
the block, and the parent joins the taps in block order.

Merge: ring results by ring key, anomalies sorted as the engine sorts them (ties only
within a ring, whose order each worker keeps), working sets
(:meth:`~.workingset.WorkingSet.merge`), push counts summed before the hottest pages are
chosen. Workers are forked (``os.fork``; the parent is worker 0) and send their results
back pickled; an error (a damaged block) is raised where one process would raise it, in
block order.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn

import numpy as np

from ...core.columns import EventColumns, columns_into
from ...core.events import Kind
from ...core.sources import EventSource
from ...errors import KvmtraceError
from ...host.cpuload import idle_cpus
from ...model.results import RingId
from .blockshm import Arena, Done, arena_bytes, block_bytes, parent_alive
from .colfeed import COLUMN_BATCH
from .engine import Replay, ReplayReport, SharedTap
from .workingset import WorkingSet

__all__ = ["MIN_EVENTS", "Failed", "Forked", "WorkerPipes", "default_jobs", "plan_blocks",
           "plan_shares", "plan_spread", "replay_parallel", "shared_blocks"]

#: below this many events a replay stays in one process unless told otherwise (the
#: forks and the copies of block shares cost more than they save)
MIN_EVENTS = 1 << 21

_FIRST, _LAST = int(Kind.PUSH), int(Kind.STALL)
Unit = tuple[int, int, int | None]  # (pid, vm, ring index), ring None: the whole VM


def _allowed_cpus() -> int:
    """How many CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_jobs() -> int:
    """The CPUs this process may run on that are idle now, at least 1
    (:func:`~kvmtrace.host.cpuload.idle_cpus`, a 100 ms sample): a worker on a CPU that
    another process keeps busy makes the replay slower than one process (0.75-0.83 x one
    process in tools/bench_parallel.py runs with a core held)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return _allowed_cpus()
    return max(1, min(len(cpus), round(idle_cpus(cpus))))


def plan_shares(source: EventSource, jobs: int
                ) -> tuple[int, int, list[set[RingId]]] | None:
    """(events, blocks, the rings of each worker: at most ``jobs``), or None when the
    source cannot be split (no group tables, an unreadable one, fewer than two units)."""
    planned = plan_blocks(source, jobs)
    return None if planned is None else planned[:3]


def plan_blocks(source: EventSource, jobs: int, *, by_ring: bool = False
                ) -> tuple[int, int, list[set[RingId]], list[tuple[int, int]]] | None:
    """As :func:`plan_shares`, and each block's (events, groups). ``by_ring``: every ring
    is a unit of its own (for readers whose rings never read each other, e.g. the
    counters of ``top --replay``, which infer no ring size)."""
    tables = source.group_tables()
    if tables is None:
        return None
    weight: dict[Unit, int] = {}
    rings: dict[Unit, set[RingId]] = {}
    sized: dict[tuple[int, int], bool] = {}
    events = 0
    blocks: list[set[RingId]] = []
    exits: set[tuple[int, int]] = set()
    sizes: list[tuple[int, int]] = []
    for count, t in tables:
        if t is None:
            return None
        events += count
        sizes.append((count, len(t)))
        k = t["kind"]
        sel = (k >= _FIRST) & (k <= _LAST)
        blocks.append(set(zip(t["pid"][sel].tolist(), t["vm"][sel].tolist(),
                              t["ring"][sel].tolist(), strict=True)))
        x = k == Kind.EXIT
        exits |= set(zip(t["pid"][x].tolist(), t["vm"][x].tolist(), strict=True))
    for keys in blocks:
        seen: set[Unit] = set()
        for p, v, r in keys:
            ok = by_ring or sized.get((p, v))
            if ok is None:  # no inference: a size in the meta, or no soft-full exit
                ok = sized[(p, v)] = (source.meta.ring_size(p, v) is not None
                                      or (p, v) not in exits)
            unit = (p, v, r if ok else None)
            rings.setdefault(unit, set()).add((p, v, r))
            seen.add(unit)
        for u in seen:
            weight[u] = weight.get(u, 0) + 1
    n = min(jobs, len(weight))
    if n < 2:
        return None
    shares: list[set[RingId]] = [set() for _ in range(n)]
    load = [0] * n
    for u in sorted(weight, key=lambda u: (-weight[u], u[0], u[1], -1 if u[2] is None
                                           else u[2])):
        w = load.index(min(load))
        load[w] += weight[u]
        shares[w] |= rings[u]
    return events, len(blocks), shares, sizes


def plan_spread(source: EventSource, jobs: int | None, min_events: int, *,
                by_ring: bool = False
                ) -> tuple[int, int, list[set[RingId]], list[tuple[int, int]]] | None:
    """:func:`plan_blocks` over up to ``jobs`` processes, or None when one process is the
    way (fewer than ``min_events`` events, or fewer than 2 processes). ``jobs`` None: the
    CPUs this process may use, then, once the source is known to be large enough, those
    idle now (:func:`default_jobs`, a 100 ms sample)."""
    cap = jobs if jobs is not None else _allowed_cpus()
    if cap < 2:
        return None
    planned = plan_blocks(source, cap, by_ring=by_ring)
    if planned is None or planned[0] < min_events:
        return None
    if jobs is None:
        jobs = default_jobs()
        if jobs < 2:
            return None
        if jobs < cap:
            planned = plan_blocks(source, jobs, by_ring=by_ring)
    return planned


@dataclass
class _Share:
    """What one worker hands back."""

    report: ReplayReport
    ws: WorkingSet | None
    blocks: list[int]  #: the blocks its tap saw
    tap: SharedTap | None


class Failed:
    """Sent in place of a block's share when the block cannot be decoded."""

    def __init__(self, err: BaseException) -> None:
        self.info = (type(err), str(err), getattr(err, "message", None),
                     getattr(err, "fix", None))

    def raise_it(self) -> NoReturn:
        cls, text, message, fix = self.info
        if isinstance(cls, type) and issubclass(cls, KvmtraceError) and message is not None:
            raise cls(message, fix)
        if isinstance(cls, type) and issubclass(cls, ValueError):
            raise ValueError(text)
        raise RuntimeError(f"a replay worker failed: {cls.__name__}: {text}")


#: own blocks a worker decodes (and hands on) ahead of the block it replays, in rounds
#: of N blocks: the others then never wait for it
AHEAD = 2
#: a worker's mark in :class:`~.blockshm.Done` once it reads no more blocks
_FINISHED = 1 << 62


def _send(outbox: dict[int, BinaryIO], msg: object) -> None:
    """A short message (a block's layout, or its error) to every other worker. Never
    blocks: at most 2 AHEAD + 1 of them wait in a pipe (a writer runs at most AHEAD rounds
    ahead of its own replay, which waits for the reader's blocks)."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    for f in outbox.values():
        try:
            f.write(data)
            f.flush()
        except OSError:  # that worker is gone: the first process sees it end
            pass


def shared_blocks(source: EventSource, n: int, w: int, sizes: list[tuple[int, int]],
                  inbox: dict[int, BinaryIO], outbox: dict[int, BinaryIO],
                  arenas: list[Arena], done: Done, alive: Callable[[], None],
                  tap: SharedTap | None = None, tapped: list[int] | None = None
                  ) -> Iterator[tuple[int, EventColumns, np.ndarray | None]]:
    """Every block of ``source`` in order, for worker ``w`` of ``n``: decodes blocks w,
    w + n, ... (:data:`AHEAD` rounds ahead) into its arena and tells the others where
    they are, and yields each block as (number, columns, its groups' starts or None): its
    own as decoded, the others' in their arenas. A block that cannot be decoded raises
    where its turn comes, in every worker. The caller marks ``done.set(w, i + 1)`` once
    it holds nothing of blocks up to ``i``; when this ends (or is closed) the worker is
    marked :data:`_FINISHED`. ``tap`` sees the blocks this worker decodes (their numbers
    appended to ``tapped``)."""
    nblocks = len(sizes)
    own = source.column_blocks(w, n)
    assert own is not None
    ready: dict[int, tuple[EventColumns, np.ndarray | None] | Failed] = {}
    nxt = w

    def produce(limit: int) -> None:
        nonlocal nxt
        while nxt <= limit and nxt < nblocks:
            room = arenas[w].reserve(nxt, block_bytes(*sizes[nxt]), done, alive)
            try:
                with columns_into(room.alloc):  # its columns straight into the arena
                    parts = next(own)
            except Exception as err:  # noqa: BLE001 - raised when its turn comes
                bad = Failed(err)
                _send(outbox, ("bad", bad))
                ready[nxt] = bad
                nxt = nblocks  # nothing after it is read
                return
            starts = parts.group_starts()
            _send(outbox, ("ok", arenas[w].commit(room, parts, starts)))
            if tap is not None:
                tap.columns(parts)
                if tapped is not None:
                    tapped.append(nxt)
            ready[nxt] = (parts, starts)
            nxt += n

    try:
        for i in range(nblocks):
            produce(i + AHEAD * n)
            src = i % n
            if src == w:
                got = ready.pop(i)
            else:
                try:
                    what, payload = pickle.load(inbox[src])
                except (EOFError, pickle.UnpicklingError, OSError) as err:
                    raise RuntimeError(f"a replay worker died ({err})") from None
                got = payload if what == "bad" else arenas[src].columns(payload)
            if isinstance(got, Failed):
                got.raise_it()
            yield i, *got
    finally:  # every worker stops at the same bad block; nobody waits for this one
        done.set(w, _FINISHED)


def _work(source: EventSource, shares: list[set[RingId]], w: int,
          sizes: list[tuple[int, int]], tap: SharedTap | None, options: dict[str, Any],
          inbox: dict[int, BinaryIO], outbox: dict[int, BinaryIO], arenas: list[Arena], done: Done,
          alive: Callable[[], None], on_block: Callable[[int], None] | None = None
          ) -> _Share:
    """Worker ``w``: replays its own rings over every block in order
    (:func:`shared_blocks`). ``on_block(events)`` after each block replayed (progress)."""
    mine = shares[w]
    meta = source.meta
    rp = Replay(meta, owns=lambda p, v, r: (p, v, r) in mine, **options)
    blocks: list[int] = []
    feed = shared_blocks(source, len(shares), w, sizes, inbox, outbox, arenas, done, alive,
                         tap, blocks)
    try:
        for i, parts, starts in feed:
            rp.feed_columns(parts, starts)
            if not rp.holds_columns:  # nothing of blocks up to i is referenced any more
                done.set(w, i + 1)
            if on_block is not None:
                on_block(parts.n)
    finally:
        feed.close()
    report = rp.finish(lost=source.lost, source_kind=meta.kind, hottest=False)  # merged
    if rp.ws is not None:
        rp.ws.strip()
    return _Share(report, rp.ws, blocks, tap)


class WorkerPipes:
    """Every pipe of ``n`` workers, made before any fork (each process then closes what
    is not its own): ``links[(a, b)]`` from worker ``a`` to worker ``b``, and
    ``results[w]`` from each worker ``w`` of ``reporters`` to the parent; (read, write)
    fds each. ``fds``: all their ends."""

    def __init__(self, n: int, reporters: Iterable[int]) -> None:
        self.n = n
        self.fds: list[int] = []
        try:
            self.links = {(a, b): self._pipe() for a in range(n) for b in range(n) if a != b}
            self.results = {w: self._pipe() for w in reporters}
        except OSError:
            self.close()
            raise

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.fds.extend((r, w))
        return r, w

    def inbox(self, w: int) -> dict[int, int]:
        """Worker ``w``'s read ends, by the worker writing to it."""
        return {a: self.links[(a, w)][0] for a in range(self.n) if a != w}

    def outbox(self, w: int) -> dict[int, int]:
        """Worker ``w``'s write ends, by the worker reading them."""
        return {b: self.links[(w, b)][1] for b in range(self.n) if b != w}

    def links_of(self, w: int) -> set[int]:
        """Worker ``w``'s ends of the links: its inbox and its outbox."""
        return {*self.inbox(w).values(), *self.outbox(w).values()}

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def _child(fds: list[int], keep: set[int], wfd: int, run: Any) -> NoReturn:
    """In the forked worker: close the pipe ends not its own, run, send the result (or
    the error) pickled to the parent through ``wfd``, exit."""
    for fd in fds:
        if fd not in keep and fd != wfd:
            os.close(fd)
    status = 0
    try:
        out: tuple[str, Any] = ("ok", run())
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        status = 1
        out = ("error", Failed(err))
    try:
        with os.fdopen(wfd, "wb") as f:
            pickle.dump(out, f, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException:  # noqa: BLE001 - the parent sees a short read
        status = 1
    os._exit(status)


class Forked:
    """``fn()`` run in a forked child process from now on (e.g. one of two inputs of
    ``compare`` while this process reads the other); :meth:`result` waits for its value
    (pickled back) or raises its error; :meth:`cancel` stops it."""

    def __init__(self, fn: Any) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child never returns
            _child([r, w], set(), w, fn)
        os.close(w)
        self._fd: int | None = r

    def result(self) -> Any:
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            return _receive(fd)
        finally:
            self._wait()

    def cancel(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._wait()

    def _wait(self) -> None:
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _receive(rfd: int) -> Any:
    with os.fdopen(rfd, "rb") as f:
        try:
            what, payload = pickle.load(f)
        except (EOFError, pickle.UnpicklingError) as err:
            raise RuntimeError(f"a replay worker died ({err})") from None
    if what == "ok":
        return payload
    payload.raise_it()


def replay_parallel(source: EventSource, jobs: int | None, tap: SharedTap | None = None, *,
                    min_events: int = MIN_EVENTS,
                    on_block: Callable[[int], None] | None = None,
                    **options: Any) -> ReplayReport | None:
    """Replay ``source`` in up to ``jobs`` processes; the report :func:`~.replay_source`
    gives in one. ``on_block(events)`` is called in this process after each block (in
    order; for progress). None (nothing done) when one process is the way: ``jobs`` < 2,
    fewer than ``min_events`` events (a recording's count, known at open), a what-if
    simulation, a tap that cannot be split, or a source without blocks or units to
    spread. ``jobs`` None: :func:`default_jobs`, sampled only once the source is known to
    be large enough."""
    if (jobs is not None and jobs < 2) or options.get("simulate_entries") or (
            tap is not None and not isinstance(tap, SharedTap)):
        return None
    planned = plan_spread(source, jobs, min_events)
    if planned is None:
        return None
    _, _, shares, sizes = planned
    n = len(shares)
    top = max((c for c, _ in sizes), default=0)
    counts = [c for c, _ in sizes]
    spans = [sum(counts[b:b + n]) for b in range(len(sizes))]  # a block to the writer's next
    arenas = [Arena(arena_bytes(sizes[w::n], COLUMN_BATCH + top, AHEAD, spans[w::n]))
              for w in range(n)]
    done = Done(n)
    pipes = WorkerPipes(n, range(1, n))  # worker 0 is this process
    fds, results = pipes.fds, pipes.results

    def run(w: int, alive: Callable[[], None]) -> _Share:
        inbox = {a: os.fdopen(fd, "rb") for a, fd in pipes.inbox(w).items()}
        outbox = {b: os.fdopen(fd, "wb") for b, fd in pipes.outbox(w).items()}
        try:
            return _work(source, shares, w, sizes,
                         tap.share() if tap is not None else None, options, inbox, outbox,
                         arenas, done, alive, on_block if w == 0 else None)
        finally:
            for f in (*inbox.values(), *outbox.values()):
                try:
                    f.close()
                except OSError:
                    pass

    kids: list[tuple[int, int]] = []  # (pid, read fd) of workers not yet heard
    pids: list[int] = []

    def children_alive() -> None:
        """In this process, waiting for room in its arena: a worker killed before it
        finished is never done with this process's blocks."""
        for w, pid in enumerate(pids, 1):
            try:
                gone = os.waitpid(pid, os.WNOHANG)[0]
            except ChildProcessError:
                gone = pid
            if gone and done.at[w] != _FINISHED:
                raise RuntimeError("a replay worker died")

    me = os.getpid()
    gc.freeze()  # the collector then leaves the objects shared at fork alone (no copies)
    try:
        for w in range(1, n):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child never returns
                _child(fds, pipes.links_of(w), results[w][1],
                       lambda w=w: run(w, parent_alive(me)))
            pids.append(pid)
        keep = pipes.links_of(0) | {r for r, _ in results.values()}
        for fd in fds:  # the children's ends: so that a dead worker's pipes end
            if fd not in keep:
                os.close(fd)
        kids = [(pid, results[w][0]) for w, pid in enumerate(pids, 1)]
        parts = [run(0, children_alive)]
        while kids:
            parts.append(_receive(kids[0][1]))  # closes the fd
            kids.pop(0)
        # joined while the workers exit (their memory unmapped), before they are reaped
        if tap is not None:
            tap.join([(p.blocks, p.tap) for p in parts if p.tap is not None])
        report = _merge(source, parts, bool(options.get("keep_harvest")))
    finally:
        gc.unfreeze()
        for pid, rfd in kids:  # an error or an interrupt: stop the workers left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.close(rfd)
            except OSError:
                pass
        for pid in pids:  # no zombies
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    return report


def _merge(source: EventSource, parts: list[_Share], keep: bool) -> ReplayReport:
    first = parts[0].report
    assert all(p.report.events == first.events for p in parts)
    rings = sorted((r for p in parts for r in p.report.rings), key=lambda r: r.ring)
    anomalies = [a for p in parts for a in p.report.anomalies]
    anomalies.sort(key=lambda a: (a.time_ns, a.ring, a.kind.value))
    report = ReplayReport(source_kind=first.source_kind, events=first.events,
                          lost=first.lost, reserved=first.reserved, rings=rings,
                          anomalies=anomalies, window_ns=first.window_ns)
    meta = source.meta
    for pid, vm in sorted({r.ring[:2] for r in rings} | set(meta.vms)):
        who = meta.vm_name(pid, vm)
        if who is not None:
            report.vms[(pid, vm)] = who
    ws = parts[0].ws
    if ws is not None:
        for p in parts[1:]:
            assert p.ws is not None
            ws.merge(p.ws)
        report.workingset = dict(ws.rings)
        report.hottest = ws.hottest()
    if keep:
        got: dict[RingId, list[tuple[int, int]]] = {}
        for p in parts:
            got.update(p.report.harvested or {})
        report.harvested = {k: got[k] for k in sorted(got)}
    return report
