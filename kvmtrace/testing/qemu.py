"""QEMU as a test peer: start it on a generated multiboot guest, talk QMP, measure.

:class:`Qemu` starts ``qemu-system-x86_64`` with the KVM dirty ring
(``-accel kvm,dirty-ring-size=N``, N entries of ``struct kvm_dirty_gfn``) on the guest of
:class:`kvmtrace.vmm.multiboot.MultibootGuest`, with no display, serial or reboot, a QMP
socket and a name (``-name guest=NAME``); ``-cpu host`` is left out (it aborts on this
host's KVM). QMP goes through the maintained client of the ``qemu.qmp`` package (asyncio
:class:`qemu.qmp.QMPClient`), driven from a private event loop by :class:`SyncQmp`.

:meth:`Qemu.calc_dirty_rate` runs ``calc-dirty-rate`` in mode ``dirty-ring`` and returns
QEMU's own figures (:class:`QemuDirtyRate`): per vCPU and total, integer MB/s. QEMU 7.2
(migration/dirtyrate.c) turns logging on, snapshots each vCPU's count of harvested
entries, sleeps ``calc-time`` s (``duration_ms``), reaps and resets every ring
(``KVM_RESET_DIRTY_RINGS``), turns logging off and computes per vCPU
``((entries * 4096) >> 20) * 1000 // duration_ms``: MiB truncated, then MiB/s truncated
(:func:`qemu_mbps`); the VM's rate is the sum of the truncated per-vCPU rates.

Cleanup: :meth:`Qemu.close` (also on ``with`` exit and on a failed start) closes QMP, asks
QEMU to quit, kills it if it does not, and removes its temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..vmm.multiboot import MultibootGuest

__all__ = ["QEMU_BINARY", "qemu_binary", "qemu_mbps", "qemu_rounding", "QemuDirtyRate",
           "SyncQmp", "Qemu", "QemuError", "CalcRecording", "record_calc_dirty_rate",
           "Agreement", "compare_with_qemu", "start_recorder", "stop_recorder"]

QEMU_BINARY = "qemu-system-x86_64"
#: QEMU's minimal firmware (Debian's qemu-system-data): boots a multiboot guest in about
#: 0.3 s where SeaBIOS takes 4-5 s on this host's KVM; SeaBIOS when it is missing
QBOOT = "/usr/share/qemu/qboot.rom"


class QemuError(RuntimeError):
    """QEMU did not start, or a QMP command failed."""


def qemu_binary() -> str | None:
    """Path of qemu-system-x86_64, or None when it is not installed."""
    return shutil.which(QEMU_BINARY)


def qemu_mbps(entries: int, duration_ms: int, page_size: int = 4096) -> int:
    """QEMU 7.2's per-vCPU dirty rate of ``entries`` harvested over ``duration_ms``:
    ``((entries * page_size) >> 20) * 1000 // duration_ms`` (two truncations)."""
    return ((entries * page_size) >> 20) * 1000 // duration_ms


def qemu_rounding(mbps: float, duration_ms: int) -> int:
    """A dirty rate of ``mbps`` (MiB/s, with its fraction) rounded the way QEMU 7.2 rounds
    its own: the MiB dirtied over ``duration_ms`` truncated, then MiB/s truncated."""
    return int(mbps * duration_ms / 1000) * 1000 // duration_ms


@dataclass(frozen=True)
class QemuDirtyRate:
    """One ``query-dirty-rate`` answer of mode ``dirty-ring`` (QEMU's integer MB/s, where
    MB is MiB of 4 KiB pages) and when kvmtrace asked for it (CLOCK_MONOTONIC ns)."""

    dirty_rate: int  #: the VM's MB/s: sum of the per-vCPU figures
    vcpu_dirty_rate: dict[int, int]  #: vCPU index -> MB/s
    calc_time_s: int  #: QEMU's calc-time, seconds
    start_time: int  #: QEMU's start time (its realtime clock, seconds)
    asked_ns: int  #: CLOCK_MONOTONIC just before calc-dirty-rate was sent
    measured_ns: int  #: CLOCK_MONOTONIC when query-dirty-rate first said "measured"


class SyncQmp:
    """A blocking wrapper of :class:`qemu.qmp.QMPClient` on its own event loop."""

    def __init__(self, name: str = "kvmtrace") -> None:
        from qemu.qmp import QMPClient

        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def connect(self, path: str, timeout: float = 10.0) -> None:
        """Connect to QEMU's QMP unix socket, retrying until ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._run(self._client.connect(path), 5.0)
                return
            except Exception as err:  # the socket is not there yet, or refused
                if time.monotonic() > deadline:
                    raise QemuError(f"no QMP on {path}: {err}") from err
                time.sleep(0.05)

    def execute(self, cmd: str, args: dict[str, Any] | None = None,
                timeout: float = 30.0) -> Any:
        """Run one QMP command; its ``return`` value."""
        from qemu.qmp import ExecuteError

        try:
            return self._run(self._client.execute(cmd, args), timeout)
        except ExecuteError as err:
            raise QemuError(f"QMP {cmd}: {err}") from err

    def close(self) -> None:
        try:
            self._run(self._client.disconnect(), 5.0)
        except Exception:  # already gone: nothing to close
            pass
        self._loop.close()


@dataclass
class Qemu:
    """One QEMU process running ``guest`` with ``vcpus`` and a dirty ring of
    ``ring_entries`` entries, named ``name``. Use as a context manager, or call
    :meth:`start` and :meth:`close`."""

    guest: MultibootGuest
    ring_entries: int = 4096
    name: str = "kvmtrace-test"
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    qmp: SyncQmp | None = None
    _dir: str | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "QEMU not started"
        return self.proc.pid

    def argv(self, kernel: str, sock: str) -> list[str]:
        """QEMU's command line."""
        binary = qemu_binary() or QEMU_BINARY
        firmware = ["-bios", QBOOT] if os.path.exists(QBOOT) else []
        return [binary, "-nodefaults", *firmware,
                "-accel", f"kvm,dirty-ring-size={self.ring_entries}",
                "-m", str(self.guest.memory_mib), "-smp", str(self.guest.vcpus),
                "-kernel", kernel, "-display", "none", "-serial", "none", "-no-reboot",
                "-qmp", f"unix:{sock},server=on,wait=off", "-name", f"guest={self.name}",
                *self.extra_args]

    def start(self) -> Qemu:
        """Write the guest, start QEMU and connect QMP; on any failure clean up and raise
        :class:`QemuError`."""
        if qemu_binary() is None:
            raise QemuError(f"{QEMU_BINARY} is not installed (tools/setup.sh --test)")
        self._dir = tempfile.mkdtemp(prefix="kvmtrace-qemu-")
        kernel = str(self.guest.write(Path(self._dir) / "guest.elf"))
        sock = os.path.join(self._dir, "qmp.sock")
        try:
            self.proc = subprocess.Popen(self.argv(kernel, sock), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
            self.qmp = SyncQmp()
            deadline = time.monotonic() + 10
            while not os.path.exists(sock):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise QemuError(f"QEMU exited or hung at start: {self._stderr()}")
                time.sleep(0.02)
            try:
                self.qmp.connect(sock)
            except QemuError as err:
                raise QemuError(f"{err}; QEMU said: {self._stderr()}") from None
            status = self.qmp.execute("query-status")
            if status.get("status") != "running":
                raise QemuError(f"QEMU status {status}: {self._stderr()}")
        except BaseException:
            self.close()
            raise
        return self

    def wait_guest(self, timeout: float = 30.0) -> float:
        """Wait until every vCPU runs the guest's loop (EIP inside
        :meth:`MultibootGuest.loop_span`, read with HMP ``info registers -a``); returns the
        seconds waited. Firmware and boot code run before that and dirty pages of their own."""
        assert self.qmp is not None, "QEMU not started"
        lo, hi = self.guest.loop_span()
        t0 = time.monotonic()
        while True:
            regs = self.qmp.execute("human-monitor-command",
                                    {"command-line": "info registers -a"})
            eips = [int(line.split()[0].removeprefix("EIP="), 16)
                    for line in regs.splitlines() if line.startswith("EIP=")]
            if len(eips) == self.guest.vcpus and all(lo <= e < hi for e in eips):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise QemuError(f"the guest did not start on every vCPU in {timeout} s: "
                                f"EIPs {[hex(e) for e in eips]}, loop {lo:#x}..{hi:#x}")
            time.sleep(0.05)

    def _stderr(self) -> str:
        if self.proc is None or self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return " ".join(self.proc.stderr.read().split())[:500]

    def calc_dirty_rate(self, seconds: int = 2, timeout: float = 30.0) -> QemuDirtyRate:
        """QEMU's ``calc-dirty-rate`` (mode ``dirty-ring``) over ``seconds``; polls
        ``query-dirty-rate`` every 10 ms until it says ``measured``."""
        assert self.qmp is not None, "QEMU not started"
        asked = time.monotonic_ns()
        self.qmp.execute("calc-dirty-rate", {"calc-time": seconds, "mode": "dirty-ring"})
        deadline = time.monotonic() + seconds + timeout
        while True:
            info = self.qmp.execute("query-dirty-rate")
            if info.get("status") == "measured":
                break
            if time.monotonic() > deadline:
                raise QemuError(f"calc-dirty-rate did not finish: {info}")
            time.sleep(0.01)
        measured = time.monotonic_ns()
        vcpus = {int(v["id"]): int(v["dirty-rate"]) for v in info.get("vcpu-dirty-rate", [])}
        return QemuDirtyRate(int(info["dirty-rate"]), vcpus, int(info["calc-time"]),
                             int(info["start-time"]), asked, measured)

    def close(self) -> None:
        """Quit QEMU (QMP ``quit``, then SIGKILL after 5 s) and remove its files."""
        if self.qmp is not None:
            try:
                if self.proc is not None and self.proc.poll() is None:
                    self.qmp.execute("quit", timeout=5)
            except Exception:  # QEMU may close the socket before it answers
                pass
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Qemu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class CalcRecording:
    """A ``kvmtrace record -p QEMU_PID`` that ran across one ``calc-dirty-rate``."""

    qemu: QemuDirtyRate
    path: Path  #: the recording
    pid: int  #: QEMU's pid
    record_stderr: str


def record_calc_dirty_rate(qemu: Qemu, out: Path, seconds: int = 2,
                           timeout: float = 60.0) -> CalcRecording:
    """Record QEMU (``kvmtrace record -p PID``, started and attached first) while it runs
    ``calc-dirty-rate`` over ``seconds``; stop the recording (SIGINT) once QEMU has its
    figure. QEMU pushes to its rings only while dirty logging is on, here only during the
    calculation, so every push in the recording lies in QEMU's window."""
    rec = start_recorder(qemu.pid, out)
    try:
        rate = qemu.calc_dirty_rate(seconds)
        time.sleep(0.1)  # the last events reach the recording
        return CalcRecording(rate, out, qemu.pid, stop_recorder(rec, timeout))
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()


def start_recorder(pid: int, out: Path) -> subprocess.Popen:
    """``kvmtrace record -o OUT -p PID``, returned once it says it records."""
    cmd = [sys.executable, "-m", "kvmtrace", "record", "-o", str(out), "-p", str(pid)]
    rec = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    assert rec.stderr is not None
    seen = []
    while "Recording dirty-ring events" not in (line := rec.stderr.readline()):
        seen.append(line)
        if not line and rec.poll() is not None:
            raise QemuError(f"kvmtrace record exited: {''.join(seen)[-500:]}")
    return rec


def stop_recorder(rec: subprocess.Popen, timeout: float = 60.0) -> str:
    """SIGINT the recorder and wait; its stderr. Raises :class:`QemuError` on failure."""
    rec.send_signal(signal.SIGINT)
    try:
        _, err = rec.communicate(timeout=timeout)
    finally:
        if rec.poll() is None:
            rec.kill()
            rec.wait()
    if rec.returncode != 0:
        raise QemuError(f"kvmtrace record failed ({rec.returncode}): {err[-500:]}")
    return err


@dataclass(frozen=True)
class Agreement:
    """One vCPU: kvmtrace's dirty rate on QEMU's window against QEMU's ``vcpu-dirty-rate``.

    ``entries``: pushes of the vCPU's ring in QEMU's window (first push of the calculation
    to its final ``KVM_RESET_DIRTY_RINGS``); ``kvmtrace_mbps``: those x 4096 / 2**20 over
    QEMU's calc-time; ``kvmtrace_rounded``: the same rounded as QEMU rounds;
    ``span_mbps``: ``replay``'s ``dirty_rate_mbps`` of the ring (over its first to last
    push, the measured span, which QEMU does not use: it divides by calc-time)."""

    vcpu: int
    entries: int
    kvmtrace_mbps: float
    kvmtrace_rounded: int
    qemu_mbps: int
    span_mbps: float | None
    #: entries QEMU harvested in the window, from the ring's resets (reset_index advance):
    #: what QEMU counts, so ``qemu_mbps(harvested, calc-time)`` is QEMU's figure exactly
    harvested: int = 0

    @property
    def rel_diff(self) -> float:
        """|rounded - QEMU's| / QEMU's."""
        return abs(self.kvmtrace_rounded - self.qemu_mbps) / max(self.qemu_mbps, 1)


def final_reset_ns(events: Any, qemu: QemuDirtyRate) -> int:
    """QEMU's window end in a recording: the last ``kvm_dirty_ring_reset`` before QEMU
    said "measured" (its final reap: after it QEMU takes its end count and stops logging;
    pushes after it are in no count of QEMU's)."""
    from ..core.events import Kind

    ts = events["ts"][(events["kind"] == Kind.RESET) & (events["ts"] < qemu.measured_ns)]
    if not len(ts):
        raise QemuError("no ring reset during calc-dirty-rate in the recording")
    return int(ts.max())


def compare_with_qemu(events: Any, replay_json: dict[str, Any],
                      qemu: QemuDirtyRate) -> list[Agreement]:
    """Per vCPU of QEMU's answer: the pushes of ring ``vcpu`` in ``events`` (a recording's
    EVENT_DTYPE array) from the calc-dirty-rate command to the final reset
    (:func:`final_reset_ns`), as MB/s over QEMU's calc-time, against QEMU's figure; with
    ``replay --json``'s per-ring ``dirty_rate_mbps`` beside it."""
    from ..core.events import Kind

    end = final_reset_ns(events, qemu)
    push = events[(events["kind"] == Kind.PUSH) & (events["ts"] > qemu.asked_ns)
                  & (events["ts"] <= end)]
    span = {r["index"]: r["dirty_rate_mbps"] for r in replay_json["rings"]}
    calc_ms = qemu.calc_time_s * 1000
    out = []
    resets = events[events["kind"] == Kind.RESET]
    for vcpu, q in sorted(qemu.vcpu_dirty_rate.items()):
        n = int((push["ring"] == vcpu).sum())
        mbps = n * 4096 / (1 << 20) * 1000 / calc_ms
        mine = resets[resets["ring"] == vcpu]
        before = mine["reset_index"][mine["ts"] <= qemu.asked_ns]
        upto = mine["reset_index"][mine["ts"] <= end]
        harvested = ((int(upto[-1]) if len(upto) else 0)
                     - (int(before[-1]) if len(before) else 0)) & 0xFFFFFFFF
        out.append(Agreement(vcpu, n, mbps, qemu_mbps(n, calc_ms), q, span.get(vcpu),
                             harvested))
    return out
