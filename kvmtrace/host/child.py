"""Run ``-- COMMAND`` under a tracer, held before exec until the tracer is attached.

``kvmtrace record -- CMD`` and ``kvmtrace top -- CMD`` filter the probes by the child's pid,
which is compiled into the BPF programs (``-DKT_PID``), and by the processes it forks
(``-DKT_FOLLOW``: each is added in the kernel before it runs). The child therefore exists (so its
pid is known) but waits on a pipe before it execs COMMAND; :meth:`PausedChild.release` lets
it go once the probes are loaded, so not one event of COMMAND is missed. If the tracer
dies before that (killed while the probes load), the held child dies with it
(PR_SET_PDEATHSIG) and never runs COMMAND.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import IO

from ..errors import UsageError

__all__ = ["PausedChild", "check_command", "exit_status", "descendants"]

# Runs in the child: die with the tracer (PR_SET_PDEATHSIG = 1, SIGKILL), and if it is
# gone already (parent pid argv[2] no longer the parent); wait for the go byte on fd
# argv[1] (end of file: the tracer died, so exit without running COMMAND); then drop the
# death signal and become COMMAND (same pid), which from then on lives its own life.
_WAITER = (
    "import ctypes,os,sys\n"
    "prctl=ctypes.CDLL(None,use_errno=True).prctl\n"
    "prctl(1,9,0,0,0)\n"
    "if os.getppid()!=int(sys.argv[2]):os._exit(125)\n"
    "if os.read(int(sys.argv[1]),1)!=b'g':os._exit(125)\n"
    "prctl(1,0,0,0,0)\n"
    "os.execvp(sys.argv[3],sys.argv[3:])\n"
)


def check_command(command: list[str]) -> None:
    """UsageError unless ``command`` names a program that can be run (on PATH or a path)."""
    if not command:
        raise UsageError("no command after --", "e.g. -- kvmtrace workload --vcpus 2")
    if shutil.which(command[0]) is None:
        raise UsageError(f"command not found: {command[0]}",
                         "give a program on PATH or a path")


def descendants(pid: int) -> list[int]:
    """Every living descendant of process ``pid``: the children of each of its threads,
    recursively, from ``/proc/PID/task/TID/children`` (CONFIG_PROC_CHILDREN); a process
    whose parent exited has been reparented and is no longer found. [] when unreadable."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 4096:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except (OSError, ValueError):
                continue
            new = [k for k in kids if k not in found]
            found += new
            todo += new
    return found


def exit_status(returncode: int | None) -> int:
    """The exit status a tracer of ``-- COMMAND`` ends with: COMMAND's own when it failed
    (128 + N when signal N killed it, as a shell reports it), else 0."""
    if not returncode:
        return 0
    return 128 - returncode if returncode < 0 else returncode


class PausedChild:
    """COMMAND started but held before exec; ``stdout``/``stderr`` as for subprocess.

    Create it from a thread that lives until :meth:`release` (the main thread): the
    kernel sends the death signal when the thread that forked the child ends."""

    def __init__(self, command: list[str], *, stdout: IO[bytes] | int | None = None,
                 stderr: IO[bytes] | int | None = None) -> None:
        check_command(command)
        r, self._go = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _WAITER, str(r),
                                          str(os.getpid()), *command],
                                         pass_fds=(r,), stdout=stdout, stderr=stderr)
        except BaseException:
            os.close(self._go)
            raise
        finally:
            os.close(r)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        """Let the child exec COMMAND."""
        if self._go >= 0:
            os.write(self._go, b"g")
            os.close(self._go)
            self._go = -1

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def stop(self, kill: bool = False) -> None:
        """End the child if it still runs (killed outright when it never got to exec)."""
        if self._go >= 0:  # never released: kill before EOF on the pipe could let it exec
            self.proc.kill()
            os.close(self._go)
            self._go = -1
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
        self.proc.wait()
