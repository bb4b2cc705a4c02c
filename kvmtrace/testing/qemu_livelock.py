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
from .qemu import Qemu, QemuDirtyRate, QemuError
from .qemu_migrate import start_recorder, stop_recorder
from .qemu_trace import QemuTrace, read_trace, trace_args

__all__ = ["LIVELOCK_GUEST", "LivelockRun", "livelock_attempt", "first_stuck_line"]

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
