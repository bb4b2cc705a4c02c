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
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..vmm.multiboot import MultibootGuest

__all__ = ["QEMU_BINARY", "qemu_binary", "qemu_mbps", "QemuDirtyRate", "SyncQmp", "Qemu",
           "QemuError"]

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
        return [binary, "-nodefaults", *firmware, "-accel", f"kvm,dirty-ring-size={self.ring_entries}",
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
