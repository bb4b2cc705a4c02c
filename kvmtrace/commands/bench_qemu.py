"""``kvmtrace bench --qemu``: the runs of a bundle on QEMU instead of the built-in VMM.

One QEMU serves the whole bundle, started on the multiboot guest of
:class:`kvmtrace.vmm.multiboot.MultibootGuest` (each vCPU writes one byte per page over
``--pages`` pages, an ``out`` every ``--exit-every`` writes, looping) with this command
line (:func:`qemu_argv`; qboot as firmware where Debian's qemu-system-data has it)::

    qemu-system-x86_64 -nodefaults [-bios /usr/share/qemu/qboot.rom]
        -accel kvm,dirty-ring-size=ENTRIES -m MIB -smp VCPUS -kernel GUEST.elf
        -display none -serial none -no-reboot -qmp unix:SOCK,server=on,wait=off
        -name guest=kvmtrace-bench

QEMU pushes to its dirty rings only while dirty logging is on, so each run is one QMP
``calc-dirty-rate`` (mode ``dirty-ring``, ``calc-time`` = ``--duration`` rounded up, 1 s
by default) recorded by :func:`kvmtrace.commands.record.record` with ``-p QEMU_PID``;
QEMU's own answer (``query-dirty-rate``: integer MB/s per vCPU) is the run's ``truth`` in
metrics.json (with the CLOCK_MONOTONIC ns of the command and of QEMU's answer, to
line QEMU's window up with the recording). QMP goes through the ``qemu.qmp`` package's
synchronous client. QEMU harvests by itself: the workload flags that steer the built-in
VMM's harvest are refused.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KvmtraceError, MissingFeature, UsageError
from ..vmm.multiboot import MultibootGuest
from ..vmm.workload import WorkloadConfig

__all__ = ["QEMU_BINARY", "QBOOT", "QEMU_RING_ENTRIES", "check_qemu_config", "qemu_argv",
           "QemuRuns"]

QEMU_BINARY = "qemu-system-x86_64"
QBOOT = "/usr/share/qemu/qboot.rom"
#: dirty-ring-size QEMU accepts, in entries
QEMU_RING_ENTRIES = (1024, 65536)
#: the flags of --qemu when neither a preset nor flags are given
QEMU_DEFAULT_FLAGS = ("--vcpus", "2", "--ring-entries", "4096", "--pages", "16384",
                      "--exit-every", "16")


def check_qemu_config(cfg: WorkloadConfig) -> int:
    """UsageError for what QEMU cannot do; else the calc-time in seconds."""
    entries = cfg.ring_bytes // 16
    lo, hi = QEMU_RING_ENTRIES
    if not lo <= entries <= hi:
        raise UsageError(f"--qemu: a ring of {entries} entries; QEMU takes "
                         f"dirty-ring-size {lo}..{hi}", "give --ring-entries 4096")
    fixed = [("--harvest", cfg.harvest != "on-full"), ("--harvest-delay-us",
             bool(cfg.harvest_delay_us)), ("--vms", cfg.vms != 1),
             ("--vm-cycles", cfg.vm_cycles != 1), ("--migrate-ms", cfg.migrate_ms is not None),
             ("--interrupt-resets", cfg.interrupt_resets), ("--passes", cfg.passes != 1)]
    bad = [flag for flag, given in fixed if given]
    if bad:
        raise UsageError(f"--qemu: workload flag {bad[0]} steers the built-in VMM only",
                         "drop it (QEMU harvests by itself), or use a preset that "
                         "does not set it")
    if shutil.which(QEMU_BINARY) is None:
        raise MissingFeature(f"--qemu: {QEMU_BINARY} is not installed",
                             "apt-get install qemu-system-x86")
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        raise MissingFeature("--qemu needs the qemu.qmp package",
                             "pip install 'kvmtrace[qemu]'") from None
    return max(1, math.ceil(cfg.duration_s or 1))


def qemu_argv(guest: MultibootGuest, ring_entries: int, kernel: str, sock: str) -> list[str]:
    """QEMU's command line (module docstring)."""
    firmware = ["-bios", QBOOT] if os.path.exists(QBOOT) else []
    return [shutil.which(QEMU_BINARY) or QEMU_BINARY, "-nodefaults", *firmware,
            "-accel", f"kvm,dirty-ring-size={ring_entries}", "-m", str(guest.memory_mib),
            "-smp", str(guest.vcpus), "-kernel", kernel, "-display", "none", "-serial",
            "none", "-no-reboot", "-qmp", f"unix:{sock},server=on,wait=off", "-name",
            "guest=kvmtrace-bench"]


@dataclass
class QemuRuns:
    """One QEMU for every run of a bundle: :meth:`start`, then :meth:`calc_while` per
    run, then :meth:`close`."""

    cfg: WorkloadConfig
    seconds: int
    proc: subprocess.Popen | None = None
    argv: list[str] = field(default_factory=list)
    version: str = ""
    _dir: str | None = None
    _qmp: Any = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        guest = MultibootGuest(vcpus=self.cfg.vcpus, pages=self.cfg.pages,
                               pattern=self.cfg.pattern, passes=0,
                               exit_every=self.cfg.exit_every, seed=self.cfg.seed)
        self._dir = tempfile.mkdtemp(prefix="kvmtrace-bench-qemu-")
        kernel = str(guest.write(Path(self._dir) / "guest.elf"))
        sock = os.path.join(self._dir, "qmp.sock")
        self.argv = qemu_argv(guest, self.cfg.ring_bytes // 16, kernel, sock)
        self.version = subprocess.run([self.argv[0], "--version"], capture_output=True,
                                      text=True, timeout=30).stdout.split("\n")[0]
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise KvmtraceError(f"QEMU did not start: {self._stderr()}",
                                    "run the command line of kvmtrace bench --help by hand")
            time.sleep(0.05)
        self._qmp = QEMUMonitorProtocol(sock)
        self._qmp.connect()
        time.sleep(1.0)  # qboot boots the guest in about 0.3 s; its loop then runs

    def _stderr(self) -> str:
        if self.proc is None or self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return " ".join(self.proc.stderr.read().split())[:300]

    def calc_while(self, ready: Path, out: dict[str, Any]) -> threading.Thread:
        """A thread that waits until ``ready`` (the recording's ``.partial`` file: the
        probes are attached) exists, runs calc-dirty-rate and puts in ``out["qemu"]``
        QEMU's answer (``answer``: query-dirty-rate's return) and CLOCK_MONOTONIC ns (the
        recording's clock) just before the command (``asked_ns``) and once QEMU said
        "measured" (``measured_ns``); or the error in ``out["error"]``."""

        def main() -> None:
            try:
                deadline = time.monotonic() + 300
                while not any(ready.parent.glob(ready.name + ".*.partial")):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the recorder did not start")
                    time.sleep(0.02)
                asked = time.monotonic_ns()
                self._qmp.cmd("calc-dirty-rate", **{"calc-time": self.seconds,
                                                    "mode": "dirty-ring"})
                deadline = time.monotonic() + self.seconds + 30
                while True:
                    info = self._qmp.cmd("query-dirty-rate")
                    if info.get("status") == "measured" or time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
                out["qemu"] = {"answer": info, "asked_ns": asked,
                               "measured_ns": time.monotonic_ns()}
            except Exception as err:  # reported by the bench in the main thread
                out["error"] = f"{type(err).__name__}: {err}"

        thread = threading.Thread(target=main, name="qmp", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        if self._qmp is not None:
            try:
                self._qmp.cmd("quit")
            except Exception:  # QEMU may close the socket before it answers
                pass
            try:
                self._qmp.close()
            except Exception:  # already closed
                pass
            self._qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
