"""QEMU's dirty-ring livelock as a test peer: make it happen, record it, watch it live.

QEMU 7.2 on this host's KVM overflows a vCPU's ring when the guest pushes more than the
kernel's reserve (64 entries) between two guest entries: with a guest that never exits on
its own (``exit_every=0``) only the host's own exits (the timer tick) re-enter it, and a
small ring (``dirty-ring-size=1024``) overflows within milliseconds of dirty logging
starting. After the overflow the ring's ``reset_index`` ends on an entry a reset already
cleared (kvmtrace.analysis.stuck ``stranded``); QEMU, which harvests by its own fetch
index, reaps nothing from then on, never resets, and the vCPU re-enters a full ring:
``KVM_EXIT_DIRTY_RING_FULL`` tens of thousands of times a second.

:func:`livelock_attempt` starts QEMU on such a guest with its own trace
(:mod:`.qemu_trace`: soft-full exits and the entries each reap collected, per thread),
attaches ``kvmtrace top -b --json --prometheus`` (``delay_s`` refreshes) and
``kvmtrace record -p PID``, turns dirty logging on with ``calc-dirty-rate``, and keeps
everything: top's lines, one Prometheus scrape taken once top flags the ring, QEMU's
figure and trace. Whether the ring overflowed is for the caller to read from the
recording (``replay``); :func:`first_stuck_line` finds top's first flag.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..vmm.multiboot import MultibootGuest
from .qemu import Qemu, QemuDirtyRate, QemuError, start_recorder, stop_recorder
from .qemu_trace import QemuTrace, read_trace, trace_args

__all__ = ["LIVELOCK_GUEST", "LivelockRun", "livelock_attempt", "first_stuck_line",
           "livelock_failures", "top_reason"]

#: 1 vCPU writing 16384 pages over and over with no exit of its own
LIVELOCK_GUEST = MultibootGuest(vcpus=1, pages=16384, exit_every=0)


class _Lines:
    """Lines of a pipe, read by a thread, handed out with a timeout."""

    def __init__(self, pipe: IO[str]) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.q.put(line)
        self.q.put(None)

    def get(self, timeout: float = 30.0) -> str:
        line = self.q.get(timeout=timeout)
        if line is None:
            raise QemuError("kvmtrace top ended early")
        return line


@dataclass
class LivelockRun:
    """One attempt: the recording, QEMU's pid, figure and trace, top's NDJSON lines and a
    Prometheus scrape (empty when top never flagged a ring)."""

    path: Path
    pid: int
    rate: QemuDirtyRate
    qtrace: QemuTrace
    top_lines: list[dict[str, Any]] = field(default_factory=list)
    scraped: str = ""
    delay_s: float = 0.5


def first_stuck_line(lines: list[dict[str, Any]], pid: int, ring: int
                     ) -> dict[str, Any] | None:
    """top's first line flagging ring ``ring`` of ``pid`` stuck (None: none did)."""
    for line in lines:
        for r in line["rings"]:
            if r["pid"] == pid and r["index"] == ring and r["stuck"]:
                return line
    return None


def livelock_attempt(workdir: Path, *, ring_entries: int = 1024, seconds: int = 2,
                     delay_s: float = 0.5, guest: MultibootGuest = LIVELOCK_GUEST
                     ) -> LivelockRun:
    """One QEMU start with dirty logging on for ``seconds`` (calc-dirty-rate), recorded
    and watched by top; see the module docstring."""
    log = workdir / "qemu-trace.log"
    out = workdir / "livelock.kvt"
    with Qemu(guest, ring_entries=ring_entries, name="kvmtrace-livelock",
              extra_args=trace_args(log)) as qemu:
        qemu.wait_guest()
        top = subprocess.Popen(
            [sys.executable, "-m", "kvmtrace", "top", "-b", "--json", "-p", str(qemu.pid),
             "-d", str(delay_s), "--prometheus", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            assert top.stdout is not None and top.stderr is not None
            err = _Lines(top.stderr).get()
            if not err.startswith("kvmtrace top: serving http://"):
                raise QemuError(f"kvmtrace top: {err.strip()}")
            url = err.split()[-1]
            lines = _Lines(top.stdout)
            got = [json.loads(lines.get())]  # attached
            rec = start_recorder(qemu.pid, out)
            try:
                rate = qemu.calc_dirty_rate(seconds)
                time.sleep(2 * delay_s)  # two more refreshes
            finally:
                stop_recorder(rec)
            scraped = ""
            deadline = time.monotonic() + 4 * delay_s
            while time.monotonic() < deadline or not lines.q.empty():
                try:
                    got.append(json.loads(lines.get(timeout=4 * delay_s)))
                except queue.Empty:
                    break
                if not scraped and first_stuck_line(got[-1:], qemu.pid, 0) is not None:
                    with urllib.request.urlopen(url, timeout=10) as resp:
                        scraped = resp.read().decode()
        finally:
            top.terminate()
            top.wait(timeout=30)
        pid = qemu.pid
    return LivelockRun(out, pid, rate, read_trace(log), got, scraped, delay_s)


def livelock_failures(run: LivelockRun, report: dict[str, Any], text: str,
                      reasons: tuple[str, ...]) -> list[str]:
    """What ``replay --json`` (``report``), its text (``text``), top's lines and the
    Prometheus scrape of ``run`` get wrong about an overflowed ring (empty: nothing);
    ``reasons``: top's stuck reasons. Checked exactly, against QEMU's own trace: replay's
    resets of the ring are QEMU's reaps, its harvested entries QEMU's reaped total, the
    entries lost (overwritten + stranded) the pushes QEMU never reaped; replay names the
    overflow, the livelock and the stuck ring (ring 0 of QEMU's pid, in that order of
    time); top flags the ring stuck no later than its second refresh after the overflow,
    its last line has replay's lost and pushes; Prometheus says ``kvmtrace_ring_stuck`` 1
    for it."""
    bad: list[str] = []
    rings = [r for r in report["rings"] if r["pid"] == run.pid]
    if [(r["index"], r["size"]) for r in rings] != [(0, 1024)]:
        return [f"rings {[(r['index'], r['size']) for r in rings]}, expected ring 0 of 1024"]
    ring = rings[0]
    reaps = [n for v in run.qtrace.reaps.values() for n in v if n]
    if list(run.qtrace.full_exits) != [0] or run.qtrace.syncs:
        bad.append(f"QEMU's trace: exits {dict(run.qtrace.full_exits)}, "
                   f"syncs {len(run.qtrace.syncs)}")
    if (ring["resets"], ring["harvested"], ring["entries_reset"]) != (
            len(reaps), sum(reaps), sum(reaps)):
        bad.append(f"resets {ring['resets']}, harvested {ring['harvested']}, entries reset "
                   f"{ring['entries_reset']}; QEMU reaped {reaps}")
    lost = ring["overwritten"] + ring["stranded"]
    if lost != ring["pushes"] - sum(reaps) or not ring["stuck"]:
        bad.append(f"lost {lost}, stuck {ring['stuck']}: {ring['pushes']} pushed, QEMU "
                   f"reaped {sum(reaps)}")
    first: dict[str, dict[str, Any]] = {}
    for a in report["anomalies"]:
        first.setdefault(a["kind"], a)
        if (a["ring"]["pid"], a["ring"]["index"]) != (run.pid, 0):
            bad.append(f"anomaly on another ring: {a}")
    if not {"overflow", "livelock", "stuck"} <= set(first):
        return bad + [f"replay names {sorted(first)}"]
    overflow = first["overflow"]["time"]
    if not overflow <= first["livelock"]["time"] <= first["stuck"]["time"]:
        bad.append("overflow, livelock and stuck out of order")
    for kind in ("overflow", "livelock"):
        if f" {kind} ring 0 pid {run.pid} " not in text:
            bad.append(f"replay's text does not name the {kind}")
    after = [ln for ln in run.top_lines if ln["time_ns"] > overflow]
    flagged = first_stuck_line(after, run.pid, 0)
    if flagged is None or after.index(flagged) > 1:
        bad.append(f"top flagged the ring at refresh "
                   f"{None if flagged is None else after.index(flagged)} after the overflow")
    else:
        (r,) = [r for r in flagged["rings"] if r["pid"] == run.pid]
        if r["stuck_reason"] not in reasons:
            bad.append(f"top's reason {r['stuck_reason']!r}")
    last = [r for r in run.top_lines[-1]["rings"] if r["pid"] == run.pid]
    if [(r["lost"], r["pushes"]) for r in last] != [(lost, ring["pushes"])]:
        bad.append(f"top's last line {last}: replay lost {lost}, pushes {ring['pushes']}")
    stuck = [ln for ln in run.scraped.splitlines()
             if ln.startswith("kvmtrace_ring_stuck{") and f'pid="{run.pid}"' in ln]
    if len(stuck) != 1 or not stuck[0].endswith(" 1") or 'ring="0"' not in stuck[0]:
        bad.append(f"Prometheus: {stuck}")
    return bad


def top_reason(run: LivelockRun, overflow_ns: int) -> str | None:
    """top's stuck reason at its first flag after ``overflow_ns``."""
    line = first_stuck_line([ln for ln in run.top_lines if ln["time_ns"] > overflow_ns],
                            run.pid, 0)
    if line is None:
        return None
    return next(r["stuck_reason"] for r in line["rings"] if r["pid"] == run.pid)
