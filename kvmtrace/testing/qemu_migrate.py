"""QEMU live migration as a test peer: migrate a :class:`~.qemu.Qemu` guest while
``kvmtrace record -p PID`` records, and keep QEMU's own figures to hold the recording to.

:func:`record_migration` sets ``max-bandwidth`` (bytes/s) so that a guest dirtying its
pages faster than that does not converge, starts ``migrate`` to ``exec:cat > /dev/null``,
and polls ``query-migrate`` every ``poll_s`` (each poll's CLOCK_MONOTONIC send and receive
times, ``ram.dirty-sync-count`` and the rest of QEMU's ``ram`` figures). After
``syncs_before_converge`` syncs it raises ``downtime-limit`` (ms) so that QEMU's next
pending-size check lets it stop the VM and complete: one run shows a migration that does
not converge, then one that does. With the ``pause-before-switchover`` capability QEMU
stops the VM after its last live sync and waits (status ``pre-switchover``): that poll
holds the exact count of live syncs (``MigrationRun.live``); ``migrate-continue`` lets it
make its stop-and-copy sync and complete, and the final ``query-migrate`` (status
``completed``) holds the exact ``dirty-sync-count``. The stop-and-copy sync collects
what the vCPUs pushed between the last live sync and the stop; when that is nothing QEMU
does not reset the rings (``kvm_dirty_ring_reap_locked`` resets only what it collected)
and no recording can show that sync.

:func:`sync_count_violations` holds kvmtrace's sync times (the iteration boundaries of
:mod:`kvmtrace.analysis.migration`) to the polls: QEMU counts a sync (``dirty_sync_count++``
in ``migration_bitmap_sync``) before it reaps and resets, so a poll sent after kvmtrace's
n-th sync must report at least n.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .qemu import Qemu, QemuError, start_recorder, stop_recorder
from .qemu_trace import QemuTrace

__all__ = ["MigrationPoll", "MigrationRun", "record_migration", "sync_count_violations",
           "migration_failures",
           "start_recorder", "stop_recorder"]


@dataclass(frozen=True)
class MigrationPoll:
    """One ``query-migrate``: sent and answered (CLOCK_MONOTONIC ns), QEMU's answer."""

    sent_ns: int
    recv_ns: int
    info: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.info.get("status"))

    @property
    def syncs(self) -> int | None:
        """QEMU's ``ram.dirty-sync-count`` (None before QEMU reports ram figures)."""
        ram = self.info.get("ram")
        return None if ram is None else int(ram["dirty-sync-count"])


@dataclass(frozen=True)
class MigrationRun:
    """A recorded migration: the recording, QEMU's pid, every poll and the final answer."""

    path: Path
    pid: int
    polls: list[MigrationPoll]
    final: dict[str, Any]  #: query-migrate once completed
    live: MigrationPoll | None  #: the poll that saw ``pre-switchover`` (VM stopped)
    converge_ns: int | None  #: when downtime-limit was raised (None: it never was)
    record_stderr: str

    @property
    def sync_count(self) -> int:
        """QEMU's final ``dirty-sync-count``."""
        return int(self.final["ram"]["dirty-sync-count"])

    @property
    def live_sync_count(self) -> int | None:
        """QEMU's ``dirty-sync-count`` with the VM stopped before switchover (its live
        syncs; None without ``pause-before-switchover``)."""
        return None if self.live is None else self.live.syncs


def record_migration(qemu: Qemu, out: Path, *, bandwidth: int = 32 << 20,
                     syncs_before_converge: int = 4, converge_downtime_ms: int = 60_000,
                     poll_s: float = 0.01, timeout: float = 90.0,
                     pause_before_switchover: bool = True) -> MigrationRun:
    """Migrate ``qemu`` to ``exec:cat > /dev/null`` while recording it to ``out``."""
    assert qemu.qmp is not None, "QEMU not started"
    qmp = qemu.qmp
    rec = start_recorder(qemu.pid, out)
    try:
        qmp.execute("migrate-set-parameters", {"max-bandwidth": bandwidth})
        qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": pause_before_switchover}]})
        live = None
        qmp.execute("migrate", {"uri": "exec:cat > /dev/null"})
        polls: list[MigrationPoll] = []
        converge_ns = None
        deadline = time.monotonic() + timeout
        while True:
            sent = time.monotonic_ns()
            info = qmp.execute("query-migrate")
            poll = MigrationPoll(sent, time.monotonic_ns(), info)
            polls.append(poll)
            if poll.status == "completed":
                break
            if poll.status == "pre-switchover" and live is None:
                live = poll
                qmp.execute("migrate-continue", {"state": "pre-switchover"})
            if poll.status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise QemuError(f"migration did not complete: {info}")
            if (converge_ns is None and poll.syncs is not None
                    and poll.syncs >= syncs_before_converge):
                converge_ns = time.monotonic_ns()
                qmp.execute("migrate-set-parameters",
                            {"downtime-limit": converge_downtime_ms})
            time.sleep(poll_s)
        time.sleep(0.1)  # the last events reach the recording
        err = stop_recorder(rec)
        return MigrationRun(out, qemu.pid, polls, polls[-1].info, live, converge_ns, err)
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()


def sync_count_violations(sync_ts: list[int], polls: list[MigrationPoll]) -> list[str]:
    """Polls that contradict kvmtrace's sync times ``sync_ts`` (ns, in order): a poll sent
    after the n-th sync must report ``dirty-sync-count`` >= n. Empty when none does."""
    bad = []
    for p in polls:
        if p.syncs is None:
            continue
        before = sum(1 for t in sync_ts if t < p.sent_ns)
        if p.syncs < before:
            bad.append(f"poll at {p.sent_ns}: QEMU says {p.syncs} syncs, kvmtrace saw "
                       f"{before} before it")
    return bad


def migration_failures(run: MigrationRun, report: dict[str, Any], qtrace: QemuTrace,
                       vcpus: int, pages: int) -> list[str]:
    """What ``replay --json`` (``report``) gets wrong about ``run`` (empty: nothing), held
    to QEMU's own trace ``qtrace`` (:mod:`.qemu_trace`) and ``query-migrate``; ``vcpus``
    and ``pages``: the guest's, each vCPU writing each of its ``pages`` pages every pass.

    Checked exactly: one migration of QEMU's pid, the VM stopped after it; QEMU's trace
    holds ``dirty-sync-count`` syncs, all by replay's sync thread; the entries each sync
    that collected something collected are replay's syncs' ``collected``, in order; the
    syncs replay shows before the ``pre-switchover`` poll are QEMU's live syncs that
    collected something; no poll contradicts the sync times; soft-full exits per vCPU are
    QEMU's ``kvm_dirty_ring_full`` per vCPU; every window between two live syncs holds
    ``vcpus * pages`` distinct pages, ``pages`` per vCPU ring (a pass takes milliseconds,
    a window at least 100 ms)."""
    mine = [m for m in report["migrations"] if m["pid"] == run.pid]
    if len(mine) != 1:
        return [f"{len(mine)} migrations of pid {run.pid} in replay: {report['migrations']}"]
    m = mine[0]
    its = m["iterations"]
    ts = [it["ts"] for it in its]
    bad = sync_count_violations(ts, run.polls)
    if not m["stopped"]:
        bad.append("replay says the VM did not stop after the last sync")
    if len(qtrace.syncs) != run.sync_count:
        bad.append(f"QEMU's trace has {len(qtrace.syncs)} syncs, query-migrate "
                   f"{run.sync_count}")
    tids = {s.tid for s in qtrace.syncs}
    if tids != {m["tid"]}:
        bad.append(f"QEMU synced from threads {sorted(tids)}, replay says {m['tid']}")
    reaped = [s.reaped for s in qtrace.syncs if s.reaped]
    if reaped != [it["collected"] for it in its]:
        bad.append(f"QEMU's syncs reaped {[s.reaped for s in qtrace.syncs]}, replay's "
                   f"collected {[it['collected'] for it in its]}")
    exits = {r["index"]: r["soft_full_exits"] for r in report["rings"]
             if r["pid"] == run.pid}
    if exits != {i: qtrace.full_exits.get(i, 0) for i in range(vcpus)}:
        bad.append(f"soft-full exits {exits}, QEMU's {dict(qtrace.full_exits)}")
    if run.live is not None and run.live_sync_count is not None:
        # QEMU answers the poll once it is paused: no sync between its answer and
        # migrate-continue, so every live sync lies before the answer
        live = [t for t in ts if t < run.live.recv_ns]
        want = sum(1 for s in qtrace.syncs[:run.live_sync_count] if s.reaped)
        if len(live) != want:
            bad.append(f"{len(live)} syncs before pre-switchover, QEMU made "
                       f"{run.live_sync_count} of which {want} collected something")
        for it in its[1:len(live)]:
            per = sorted(r["pages"] for r in it["rings"])
            if it["pages"] != vcpus * pages or per != [pages] * vcpus:
                bad.append(f"iteration {it['number']}: {it['pages']} pages {per}, the "
                           f"guest dirties {pages} per vCPU x {vcpus}")
    return bad
