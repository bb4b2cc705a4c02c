"""Run ``-- COMMAND`` under a tracer, held before exec until the tracer is attached.

``kvmtrace record -- CMD`` and ``kvmtrace top -- CMD`` filter the probes by the child's pid,
which is compiled into the BPF programs (``-DKT_PID``). The child therefore exists (so its
pid is known) but waits on a pipe before it execs COMMAND; :meth:`PausedChild.release` lets
it go once the probes are loaded, so not one event of COMMAND is missed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import IO

from ..errors import UsageError

__all__ = ["PausedChild"]

# Runs in the child: wait for the go byte on fd argv[1], then become COMMAND (same pid).
_WAITER = "import os,sys;os.read(int(sys.argv[1]),1);os.execvp(sys.argv[2],sys.argv[2:])"


class PausedChild:
    """COMMAND started but held before exec; ``stdout``/``stderr`` as for subprocess."""

    def __init__(self, command: list[str], *, stdout: IO[bytes] | int | None = None,
                 stderr: IO[bytes] | int | None = None) -> None:
        if not command:
            raise UsageError("no command after --", "e.g. -- kvmtrace workload --vcpus 2")
        if shutil.which(command[0]) is None:
            raise UsageError(f"command not found: {command[0]}",
                             "give a program on PATH or a path")
        r, self._go = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _WAITER, str(r), *command],
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
