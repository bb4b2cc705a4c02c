"""Capture the kernel's own text of the dirty-ring tracepoints for one command: tracefs
(a private instance filtered on the command's pid and its threads) or ``perf record``
then ``perf script``. Both return (trace text path, the command's stdout).
:class:`PerfSession` is ``perf record -a`` switched on through its control fifo (for a
capture that must be recording before the workload starts). Shared by the tests and
tools/ (soak_text, soak_replay through tests/replay_capture.py)."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from kvmtrace.core.events import Kind

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("kvm_dirty_ring_push", "kvm_dirty_ring_reset", "kvm_dirty_ring_exit",
          "kvm_userspace_exit")
HERE = Path(__file__).resolve().parent
#: python -c program: wait for one byte on stdin, then exec argv[1:] (see :func:`held`)
HOLD = "import os, sys\nsys.stdin.read(1)\nos.execv(sys.executable, sys.argv[1:])"


def held(cmd: list[str]) -> list[str]:
    """argv of ``cmd`` (a command of this interpreter: ``cmd[0]`` is ``sys.executable``)
    that first waits for a line on stdin, as :func:`tracefs_capture` wants."""
    return [sys.executable, "-c", HOLD, *cmd]


def multivm_cmd(vms: int, *flags: str, wait: bool = False) -> list[str]:
    """argv of tests/multivm.py: ``vms`` built-in VMs in one process."""
    return [sys.executable, str(HERE / "multivm.py"), str(vms),
            *(["--wait"] if wait else []), *flags]


def tracefs_capture(out: Path, cmd: list[str], *, events: Sequence[str] = EVENTS,
                    tgid: bool = False, timeout: float = 120) -> tuple[Path, str]:
    """Run ``cmd`` (which reads one line from stdin before it starts, as multivm.py
    --wait or :func:`held`) with ``events`` (kvm:*) enabled in a tracefs instance of its
    own, filtered on its pid (threads follow through ``event-fork``); write the instance's
    ``trace`` to ``out``. ``tgid``: options/record-tgid (the pid column). RuntimeError
    with its stderr if ``cmd`` fails."""
    inst = TRACEFS / "instances" / f"kvmtrace-test-{os.getpid()}-{time.monotonic_ns()}"
    inst.mkdir()
    try:
        (inst / "buffer_size_kb").write_text("32768\n")
        (inst / "options" / "event-fork").write_text("1\n")
        (inst / "options" / "record-tgid").write_text("1\n" if tgid else "0\n")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            (inst / "set_event_pid").write_text(f"{proc.pid}\n")
            for name in events:
                (inst / "events" / "kvm" / name / "enable").write_text("1\n")
            (inst / "tracing_on").write_text("1\n")
            stdout, stderr = proc.communicate("go\n", timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        (inst / "tracing_on").write_text("0\n")
        if proc.returncode != 0:
            raise RuntimeError(f"the traced command exited {proc.returncode}: "
                               f"{stderr[-2000:]}")
        out.write_bytes((inst / "trace").read_bytes())
        return out, stdout
    finally:
        for name in events:
            try:
                (inst / "events" / "kvm" / name / "enable").write_text("0\n")
            except OSError:
                pass
        inst.rmdir()


class PerfSession:
    """``perf record -a -e kvm:EVENT ...`` into ``out``/perf.data, started with recording
    off (``-D -1``) and switched on through perf's control fifo: entering returns once
    perf acknowledged ``enable``, so it records before the workload starts (``perf record
    -- CMD`` here sometimes records nothing). ``mmap_pages``: perf's ``-m``. perf's
    stderr goes to ``out``/perf.err. :meth:`stop` ends the recording; :meth:`script`
    writes its ``perf script`` text."""

    def __init__(self, out: Path, events: Sequence[str] = EVENTS[:3], *,
                 mmap_pages: int | None = None) -> None:
        perf = shutil.which("perf")
        if perf is None:
            raise FileNotFoundError("perf")
        self.perf, self.out = perf, out
        self.data, self.err = out / "perf.data", out / "perf.err"
        self._ctl, self._ack = out / "perf.ctl", out / "perf.ack"
        self._cmd = [perf, "record", "-a", "-D", "-1", "--control",
                     f"fifo:{self._ctl},{self._ack}",
                     *(["-m", str(mmap_pages)] if mmap_pages else []), "-o", str(self.data)]
        for name in events:
            self._cmd += ["-e", f"kvm:{name}"]
        self.proc: subprocess.Popen[bytes] | None = None
        self._fds: list[int] = []

    def __enter__(self) -> PerfSession:
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            os.mkfifo(self._ctl)
            os.mkfifo(self._ack)
            # O_RDWR: opening a fifo then does not block
            self._fds = [os.open(self._ctl, os.O_RDWR), os.open(self._ack, os.O_RDWR)]
            self._ctl_fd, self._ack_fd = self._fds
            with self.err.open("w") as err:
                self.proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=err)
            os.write(self._ctl_fd, b"enable\n")
            ready, _, _ = select.select([self._ack_fd], [], [], 60)
            if not ready or not os.read(self._ack_fd, 64).startswith(b"ack"):
                raise RuntimeError(f"perf did not acknowledge enable: {self.stderr()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def stop(self, timeout: float = 60) -> str:
        """SIGINT, as a user's Ctrl-C: perf writes perf.data out and exits (0, or by
        re-raising SIGINT). Returns perf's stderr."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=timeout)
        return self.stderr()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def script(self, path: Path, *, pid: int | None = None, ns: bool = False,
               timeout: float = 120) -> str:
        """``perf script`` of the recording (only ``pid``'s events if given; ``ns``:
        nanosecond timestamps, else perf's default microseconds) with the pid/tid column,
        into ``path``; returns perf script's stderr."""
        cmd = [self.perf, "script", "-i", str(self.data),
               *(["--pid", str(pid)] if pid is not None else []), *(["--ns"] if ns else []),
               "-F", "comm,pid,tid,cpu,time,event,trace"]
        with path.open("w") as f:
            sp = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True, check=True,
                                timeout=timeout)
        return sp.stderr

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._ctl.unlink(missing_ok=True)
        self._ack.unlink(missing_ok=True)


def perf_capture(out: Path, cmd: list[str], *, pid_column: bool = False,
                 timeout: float = 120) -> tuple[Path, str]:
    """``perf record -e kvm:kvm_dirty_ring_{push,reset,exit} -- cmd`` then ``perf script``
    (default fields, microseconds; ``pid_column``: -F with pid/tid and --ns)."""
    perf = shutil.which("perf")
    assert perf is not None
    data = out.with_suffix(".data")
    rec = [perf, "record", "-m", "4096", "-o", str(data)]  # 16 MiB per CPU: no loss
    for name in EVENTS[:3]:
        rec += ["-e", f"kvm:{name}"]
    script = [perf, "script", "-i", str(data)]
    if pid_column:
        script += ["--ns", "-F", "comm,pid,tid,cpu,time,event,trace"]
    # perf record here writes a file without samples while another perf session records
    # the same tracepoints system-wide (other tests on a shared host): try again later
    for attempt in range(6):
        if attempt:
            time.sleep(2)
        proc = subprocess.run([*rec, "--", *cmd], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        # perf reports dropped samples only here ("lost N chunks", "LOST n events")
        assert "lost" not in proc.stderr.lower(), proc.stderr
        with out.open("w") as f:
            subprocess.run(script, stdout=f, stderr=subprocess.DEVNULL, check=False,
                           timeout=timeout)
        if out.stat().st_size:
            return out, proc.stdout
    raise AssertionError(f"perf record wrote no samples six times: {proc.stderr}")


# -- what a capture of built-in VMs is held to -------------------------------------------

#: tests/multivm.py flags of the two-VM text scenarios (test_text_vms_kvm, soak_text)
VM_WORKLOADS: dict[str, tuple[str, ...]] = {
    # soft-full exits, resets by the vCPU threads and by a reaper per VM; the VMs dirty
    # 2000 and 2200 pages, so their last resets (the VMM's final harvest, which changes
    # no ring when the reaper got there first) differ in their indices
    "reaper-exits": ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "2000",
                     "--pages-step", "200", "--passes", "2", "--exit-every", "8",
                     "--harvest", "reaper", "--reaper-ms", "2"),
    # identical VMs end in identical indices: the VMM's final reset call on each, when its
    # reaper got there first, changes no ring and fits both VMs (the text cannot tell)
    "same-vms": ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "2000",
                 "--passes", "2", "--exit-every", "8", "--harvest", "reaper",
                 "--reaper-ms", "2"),
    # a reaper every ms racing vCPUs that never exit (1 MiB rings: no overflow)
    "fast-reaper": ("--vcpus", "2", "--ring-bytes", "1048576", "--pages", "20000",
                    "--duration", "0.5", "--exit-every", "0", "--harvest", "reaper",
                    "--reaper-ms", "1"),
    # each thread closes its VM and creates another (new vCPU threads, fds reused)
    "fd-reuse": ("--cycles", "2", "--vcpus", "2", "--ring-bytes", "4096", "--pages",
                 "2000", "--pages-step", "200", "--passes", "2", "--exit-every", "8",
                 "--harvest", "reaper", "--reaper-ms", "2"),
    "on-full": ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "3000",
                "--pages-step", "100", "--passes", "2", "--exit-every", "1"),
}

#: the per-ring counts every reader must give exactly as the VMM made them
COUNTS = ("pushes", "entries_reset", "resets", "soft_full_exits")


def counts(ring: object) -> tuple[int, ...]:
    """:data:`COUNTS` of any per-ring counter object (the aggregator's RingCounters, a
    replay's ring result, a profile's ring row)."""
    return tuple(getattr(ring, name) for name in COUNTS)


def vmm_counts(vm: dict[str, Any]) -> dict[int, tuple[int, ...]]:
    """Per ring index of one VM's ground truth (``workload --json``): its pages written,
    entries reset, KVM_RESET_DIRTY_RINGS calls (one reset event per ring each) and
    soft-full exits, in :data:`COUNTS` order."""
    return {r["index"]: (r["pages_written"], r["entries_reset"], vm["resets"],
                         r["soft_full_exits"]) for r in vm["rings"]}


def vmm_counts_by_vm(truth: list[dict[str, Any]], ev: np.ndarray
                     ) -> dict[tuple[int | None, int], tuple[int, ...]]:
    """:func:`vmm_counts` of several VMs keyed (VM id, ring index), a VM's id being the one
    its vCPU threads' pushes carry in ``ev`` (None unless exactly one)."""
    pushes = ev[ev["kind"] == Kind.PUSH]
    out: dict[tuple[int | None, int], tuple[int, ...]] = {}
    for vm in truth:
        ids = {int(x) for r in vm["rings"]
               for x in np.unique(pushes["vm"][pushes["tid"] == r["tid"]])}
        vid = next(iter(ids)) if len(ids) == 1 else None
        for index, c in vmm_counts(vm).items():
            out[(vid, index)] = c
    return out


def text_is_whole(text: str, truth: list[dict[str, Any]]) -> bool:
    """Whether trace ``text`` has a push line for every page each vCPU thread wrote and a
    reset line for every ring of every KVM_RESET_DIRTY_RINGS call, counted on the kernel's
    own text (not through the importer): perf on a busy host now and then writes a
    perf.data that lacks events without reporting a loss."""
    return all(len(re.findall(rf"\b{r['tid']}\b[^\n]*kvm_dirty_ring_push", text))
               == r["pages_written"] for vm in truth for r in vm["rings"]) and text.count(
        "kvm_dirty_ring_reset:") == sum(vm["resets"] * vm["vcpus"] for vm in truth)


def capture_vms(how: str, flags: Sequence[str], out: Path, vms: int = 2
                ) -> tuple[Path, list[dict[str, Any]], bool]:
    """``vms`` built-in VMs in one process (tests/multivm.py ``flags``) captured by
    ``how`` ("tracefs" or "perf") into ``out``: (the text, the VMs' ground truths,
    whether the text is whole: :func:`text_is_whole`)."""
    if how == "tracefs":
        path, stdout = tracefs_capture(out, multivm_cmd(vms, *flags, wait=True))
    else:
        path, stdout = perf_capture(out, multivm_cmd(vms, *flags))
    truth = json.loads(stdout)
    return path, truth, text_is_whole(path.read_text(), truth)
