"""A child process held before it starts (it waits for a byte on stdin) so that a tracer
can attach to its pid first: attach the tracer (the child is killed if that fails), then
release the child and read the JSON it prints (the built-in VMM's ground truth)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["attach", "release"]

T = TypeVar("T")


def attach(child: subprocess.Popen[bytes], make: Callable[[], T]) -> T:
    """``make()`` (probes or a source filtered on ``child.pid``) while ``child`` is held;
    if it raises, the child is killed and reaped first."""
    try:
        return make()
    except BaseException:
        child.kill()
        child.wait()
        raise


def release(child: subprocess.Popen[bytes]) -> Any:
    """Let a held child run (one byte on its stdin, then EOF) and wait for it: the JSON it
    printed on stdout. RuntimeError if it exited non-zero or a VM of it failed (a None
    in a printed list)."""
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(b"go")
    child.stdin.close()
    out = child.stdout.read()
    if child.wait() != 0:
        raise RuntimeError(f"the held child exited {child.returncode}: {out[-500:]!r}")
    truth = json.loads(out)
    if isinstance(truth, list) and None in truth:
        raise RuntimeError("a VM of the held child failed (its traceback is on stderr)")
    return truth
