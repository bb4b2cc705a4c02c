"""``top --replay`` on every core: the rings of a recording spread over worker processes,
each counting its rings window by window, the parent merging each window's counters.

Rings (``struct kvm_dirty_ring``) are independent in the counters of
:class:`~.aggregate.Aggregator` (it infers no ring size), so any ring is a unit of work
(:func:`~.replay.parallel.plan_blocks` with ``by_ring``). The blocks travel as in
``replay -j`` (:func:`~.replay.parallel.shared_blocks`: worker ``w`` decodes blocks ``w,
w + N, ...`` into its shared-memory arena, the others read them in place), so every
worker sees every block in order. Each walks the file's time with the same
:class:`~.aggregate.StepClock` as one process (the windows depend on every event's time,
which each worker has), feeds its own rings' events of each window, and sends the parent
what changed in that window: the counters of the rings it fed or resized, the VMs when
one was added or resized. What is global comes out as in one process: every worker reads
every KT_RING_SIZE event (ring sizes, VM rows), worker 0 alone the KVM_RESET_DIRTY_RINGS
latencies (VM counters), the lost events and the final window's end; a ring no plan
named (none should exist) is worker 0's.

The parent is no worker: :meth:`SpreadReplaySource.snapshot` reads one message per
worker (in worker order) and merges them into the Snapshot one process would give.
Workers run ahead of the parent by what their pipes hold (1 MiB each where the kernel
allows). A damaged block fails where one process fails: every worker meets it in the
same window and sends its error in place of that window's counters. Workers ignore
SIGINT (the parent ends them: :meth:`~SpreadReplaySource.close`) and stop when the
parent is gone.
"""

from __future__ import annotations

import fcntl
import gc
import os
import pickle
import select
import signal
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from ..core.columns import EventColumns
from ..core.counters import RingCounters, RingKey, Snapshot, VmCounters, VmInfo, VmKey
from ..core.sources import EventSource, SnapshotSource
from ..errors import KvmtraceError
from ..model.results import RingId
from .aggregate import Aggregator, ReplaySource, StepClock

if TYPE_CHECKING:  # imported when spreading (the replay engine's modules: 30-60 ms)
    from .replay.blockshm import Arena, Done
    from .replay.parallel import Failed

__all__ = ["MIN_EVENTS", "SpreadReplaySource", "open_replay"]

#: below this many events ``top --replay`` stays in one process unless told otherwise:
#: the counters cost little beside decoding, which the workers share with some overhead
#: (tools/bench_top.py --replay, 2 cores: -j 2 / -j 1 about 1.0 at 8 M events, 1.4 at
#: 32 M), and the idle-CPU sample alone takes 100 ms
MIN_EVENTS = 1 << 24

_PIPE_BYTES = 1 << 20  # what a worker may write ahead of the parent (F_SETPIPE_SZ)
_LEN = struct.Struct("<Q")  # each message's length, before it


def open_replay(source: EventSource, step_ns: int, *, pid: int = 0, jobs: int | None = 1,
                min_events: int | None = None) -> SnapshotSource:
    """The SnapshotSource of ``top --replay``: :class:`SpreadReplaySource` over up to
    ``jobs`` processes (None: the idle CPUs, :func:`~.replay.parallel.default_jobs`,
    sampled only for a source of at least ``min_events`` events, default
    :data:`MIN_EVENTS`) when the source has blocks with two rings or
    more to spread; else :class:`~.aggregate.ReplaySource` in this process. The same
    snapshots either way."""
    if step_ns <= 0:
        raise ValueError("step_ns must be positive")
    one = (jobs is not None and jobs < 2) or source.group_tables() is None  # no blocks
    spread = None if one else _plan(source, jobs, min_events)
    if spread is None:
        return ReplaySource(source, step_ns, pid=pid)
    return SpreadReplaySource(source, step_ns, *spread, pid=pid)


def _plan(source: EventSource, jobs: int | None, min_events: int | None
          ) -> tuple[list[set[RingId]], list[tuple[int, int]]] | None:
    from .replay.parallel import plan_spread

    planned = plan_spread(source, jobs, MIN_EVENTS if min_events is None else min_events,
                          by_ring=True)
    if planned is None:
        return None
    return planned[2], planned[3]


class SpreadReplaySource(SnapshotSource):
    """:class:`~.aggregate.ReplaySource`'s snapshots, the rings counted by one worker
    process per share of ``shares`` (see the module docstring); ``sizes``: each block's
    (events, groups). The workers start at once; :meth:`close` ends them."""

    def __init__(self, source: EventSource, step_ns: int, shares: list[set[RingId]],
                 sizes: list[tuple[int, int]], *, pid: int = 0) -> None:
        self.source = source
        self.meta = source.meta
        self.step_ns = int(step_ns)
        self.jobs = len(shares)
        self._rings: dict[RingKey, RingCounters] = {}
        self._vms: list[dict[tuple[int, int], VmInfo]] = [{} for _ in shares]
        self._vm_counters: dict[VmKey, VmCounters] = {}
        self._last: Snapshot | None = None
        self._done = False
        self._failed: Failed | None = None
        self._ahead: Snapshot | None = None  # read by ``warnings``, not yet handed out
        self._pids: list[int] = []
        self._reads: list[int] = []
        self._bufs: list[bytearray] = []
        self._fork(shares, sizes, pid)

    # -- the workers ----------------------------------------------------------------------
    def _fork(self, shares: list[set[RingId]], sizes: list[tuple[int, int]], pid: int) -> None:
        from .replay import parallel
        from .replay.blockshm import Arena, Done, arena_bytes

        n = len(shares)
        top = max((c for c, _ in sizes), default=1)
        arenas = [Arena(arena_bytes(sizes[w::n], top, parallel.AHEAD)) for w in range(n)]
        done = Done(n)
        pipes = parallel.WorkerPipes(n, range(n))  # every worker reports to this process
        fds, results = pipes.fds, [pipes.results[w] for w in range(n)]
        for r, _ in results:
            try:
                fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
            except (OSError, AttributeError):  # above the limit: the default pipe
                pass
        me = os.getpid()
        gc.freeze()  # the collector then leaves the objects shared at fork alone
        try:
            for w in range(n):
                child = os.fork()
                if child == 0:  # pragma: no cover - the child never returns
                    own = pipes.links_of(w) | {results[w][1]}
                    _child(fds, own, lambda w=w: _work(
                        self.source, self.step_ns, pid, shares, w, sizes, pipes.inbox(w),
                        pipes.outbox(w), arenas, done, me, results[w][1]))
                self._pids.append(child)
        except BaseException:
            pipes.close()  # every end, the workers' too
            self.close()
            raise
        finally:
            gc.unfreeze()
        for fd in fds:  # the workers' ends: a dead worker's pipe then ends
            if fd not in {r for r, _ in results}:
                os.close(fd)
        self._reads = [r for r, _ in results]
        self._bufs = [bytearray() for _ in results]

    def _receive(self, w: int) -> tuple[Any, ...]:
        """Worker ``w``'s next message (length-prefixed pickle); raises if a worker ended
        without one."""
        fd, buf = self._reads[w], self._bufs[w]
        need = _LEN.size
        while True:
            if len(buf) >= _LEN.size:
                need = _LEN.size + _LEN.unpack_from(buf)[0]
                if len(buf) >= need:
                    break
            if not select.select([fd], [], [], 0.5)[0]:
                self._check_workers()
                continue
            chunk = os.read(fd, max(1 << 16, need - len(buf)))
            if not chunk:
                raise _died()
            buf += chunk
        msg = pickle.loads(bytes(buf[_LEN.size:need]))
        del buf[:need]
        return msg

    def _check_workers(self) -> None:
        """Raises if a worker was killed or failed (a worker that sent all it had ends
        with status 0)."""
        for i, child in enumerate(self._pids):
            if child <= 0:
                continue
            try:
                got, status = os.waitpid(child, os.WNOHANG)
            except ChildProcessError:
                got, status = child, 0
            if got:
                self._pids[i] = -child  # reaped
                if status != 0:
                    raise _died()

    # -- SnapshotSource -------------------------------------------------------------------
    @property
    def warnings(self) -> list[str]:
        """The source's one-line warnings; as in one process, asking first reads the first
        window (an error in the first block is raised here)."""
        if self._last is None:
            self._ahead = self._round()
        return list(self.source.warnings)

    @property
    def done(self) -> bool:
        return self._done

    def snapshot(self) -> Snapshot:
        if self._ahead is not None:
            snap, self._ahead = self._ahead, None
            return snap
        if self._last is None or not self._done:
            return self._round()
        return self._last

    def _round(self) -> Snapshot:
        """The next window: a message from every worker, merged."""
        if self._failed is not None:
            _raise(self._failed)
        got = [self._receive(w) for w in range(self.jobs)]
        for msg in got:
            if msg[0] == "error":
                self._failed = msg[1]
                self.close()
                _raise(msg[1])
        time_ns, done, lost = got[0][1], got[0][2], got[0][4]
        for w, (_, _, _, (rings, vms, vmc), _) in enumerate(got):
            self._rings.update(rings)
            if vms is not None:
                self._vms[w] = vms
            self._vm_counters.update(vmc)
        vms_all: dict[tuple[int, int], VmInfo] = {}
        for part in self._vms:
            vms_all.update(part)
        self._last = Snapshot(
            time_ns=time_ns,
            rings=dict(sorted(self._rings.items())),
            vms=dict(sorted(vms_all.items())),
            vm_counters=dict(sorted(self._vm_counters.items())),
            lost_events=lost,
        )
        self._done = bool(done)
        if self._done:
            self._reap()
        return self._last

    def _reap(self) -> None:
        for fd in self._reads:
            os.close(fd)
        self._reads = []
        for i, child in enumerate(self._pids):
            if child > 0:
                try:
                    os.waitpid(child, 0)
                except ChildProcessError:
                    pass
                self._pids[i] = -child

    def close(self) -> None:
        """End the workers (at once, wherever they are) and reap them."""
        for child in self._pids:
            if child > 0:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._reap()


def _raise(failed: Failed) -> NoReturn:
    """A worker's error as one process raises it (the file's: a damaged block); a
    worker that lost another one says so in one line."""
    try:
        failed.raise_it()
    except RuntimeError:
        raise _died() from None


def _died() -> KvmtraceError:
    return KvmtraceError("a top --replay worker process ended before the end of the file "
                         "(killed?)", "run it again, or with -j 1 (one process)")


def _child(fds: list[int], own: set[int], run: Any) -> NoReturn:
    """In a forked worker: SIGINT is the parent's to act on; close the pipe ends not its
    own; run; exit (0 once everything was sent, its error included)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    status = 1
    try:
        for fd in fds:
            if fd not in own:
                os.close(fd)
        status = 0 if run() else 1
    except BaseException:  # noqa: BLE001 - nothing may escape a forked child
        status = 1
    os._exit(status)


def _work(source: EventSource, step_ns: int, pid: int, shares: list[set[RingId]], w: int,
          sizes: list[tuple[int, int]], inbox_fds: dict[int, int], outbox_fds: dict[int, int],
          arenas: list[Arena], done: Done, parent: int, result_fd: int) -> bool:
    """Worker ``w``: counts its rings window by window over every block; sends each
    window's changes (or its error) to the parent. True once all was sent."""
    from .replay.blockshm import parent_alive
    from .replay.parallel import Failed, shared_blocks

    inbox = {a: os.fdopen(fd, "rb") for a, fd in inbox_fds.items()}
    outbox = {b: os.fdopen(fd, "wb") for b, fd in outbox_fds.items()}
    out = os.fdopen(result_fd, "wb")
    mine = shares[w]
    if w == 0:
        named = set().union(*shares)
        owns = lambda key: key in mine or key not in named  # noqa: E731
    else:
        owns = mine.__contains__
    agg = Aggregator(source.meta, pid=pid, owns=owns, vm_events=w == 0)
    feed = shared_blocks(source, len(shares), w, sizes, inbox, outbox, arenas, done,
                         parent_alive(parent))

    def blocks() -> Iterator[tuple[EventColumns, np.ndarray | None]]:
        for i, parts, starts in feed:
            done.set(w, i)  # the clock holds nothing of the blocks before this one
            yield parts, starts

    def send(msg: tuple[Any, ...]) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_LEN.pack(len(data)))
        out.write(data)
        out.flush()

    clock = StepClock(blocks(), step_ns, agg.feed_columns)
    try:
        try:
            time_ns = clock.start()
            send(("snap", time_ns, clock.done, agg.take_changes(), 0))
            while not clock.done:
                until = clock.advance()
                time_ns = max(time_ns, agg.time_ns) if clock.done else until
                lost = int(source.lost) if clock.done else 0
                send(("snap", time_ns, clock.done, agg.take_changes(), lost))
        except Exception as err:  # noqa: BLE001 - the parent raises it in its turn
            send(("error", Failed(err)))
        finally:
            feed.close()
        out.close()
    except OSError:  # the parent is gone
        return False
    return True
