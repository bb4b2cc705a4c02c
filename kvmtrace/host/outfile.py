"""Output files that never clobber a user's file: the one way kvmtrace creates files.

Every file kvmtrace writes (recordings, Parquet and Perfetto exports, ``--dump-harvest``
JSON) is written to a new temporary file in the destination's directory, created mode 0600
with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a symlink or an existing file at that name is never
opened), and renamed over the destination only once it is complete. Before anything is
created, :func:`check_output` refuses (``UsageError``, one line, exit 2) a destination that
is a symlink or a directory, whose directory does not exist, or that is one of the command's
inputs (the same file by ``st_dev``/``st_ino``, so also through a symlink or a hard link;
or the same path when neither exists yet). An existing device or FIFO (``/dev/null``) and
``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N`` (the process's own fds, though links) are
written in place: a rename would replace the device node.

Two kinds of temporary file:

- **exports** (:func:`atomic_output`): ``.NAME.PID.TOKEN.tmp``, hidden, fsynced before
  it is renamed into place and the directory after. It is removed on
  any error, on Ctrl-C, SIGTERM and SIGHUP; the destination is untouched. SIGKILL leaves it
  behind; the next write to the same destination removes such leftovers whose writer
  process no longer runs.
- **recordings** (:func:`create_partial` / :func:`commit`): ``NAME.PID.partial``, visible
  and readable while the recorder runs. A recorder killed with SIGKILL leaves it (a
  recording up to its last flushed block; ``kvmtrace replay`` reads it) and the destination
  untouched; a clean end fsyncs it and renames it to NAME, first moving an existing
  non-empty NAME to ``NAME.old`` when asked (like ``perf record``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import OutputError, UsageError

__all__ = ["OUTPUT_MODE", "AtomicOutput", "check_output", "atomic_output", "is_special",
           "open_special", "create_partial", "commit", "discard"]

#: mode of every file kvmtrace creates (like perf.data): a recording is a memory-access
#: trace of a guest
OUTPUT_MODE = 0o600
#: errors of writing the output (not of reading the input): said as such, exit 1
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_output(path: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = (),
                 *, flag: str = "output") -> Path:
    """``path`` as a Path if kvmtrace may write it; else UsageError (one line, exit 2).

    ``flag`` names the option in the message (e.g. ``--parquet``)."""
    out = Path(path)
    try:
        st = out.lstat()
    except FileNotFoundError:
        st = None
    except OSError as err:
        raise UsageError(f"{flag} {out}: {err.strerror}", "give another output path") from None
    std = _fd_name(out)
    if std is not None:  # the caller's own fd (/dev/stdout): its file, not a link, counts
        try:
            st = os.fstat(std)
        except OSError as err:
            raise UsageError(f"{flag} {out}: {err.strerror}", "give a file path") from None
    elif st is not None and stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{flag} {out} is a symlink: kvmtrace does not write through one",
                         "give the real path, or remove the link")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{flag} {out} is a directory", "give a file name")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: directory {parent} does not exist",
                         "create it or pick another path")
    for inp in inputs:
        try:
            ist = os.stat(inp)
        except OSError:
            ist = None
        if st is not None and ist is not None:
            try:
                same = _same(st if std is not None else os.stat(out), ist)
            except OSError:
                same = False
        else:
            same = os.path.realpath(inp) == os.path.realpath(out)
        if same:
            raise UsageError(f"{flag} {out} is the input {inp}: it would be overwritten",
                             "write the output to another file")
    return out


def _sweep(out: Path) -> None:
    """Remove this user's ``.NAME.PID.*.tmp`` left by exports whose process is gone."""
    pat = re.compile(r"\." + re.escape(out.name) + r"\.(\d+)\.[0-9a-f]+\.tmp\Z")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return
    for name in names:
        m = pat.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # still running (or not ours to signal): leave it
        except ProcessLookupError:
            pass
        except OSError:
            continue
        p = out.parent / name
        with contextlib.suppress(OSError):
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                p.unlink()


def _create(temp: Path) -> int:
    return os.open(temp, _FLAGS, OUTPUT_MODE)


@dataclass
class AtomicOutput:
    """The file being written: ``file`` (an open file object on ``temp``) for the caller to
    write; it becomes ``path`` when the ``with`` block ends without an exception."""

    path: Path
    temp: Path
    file: IO[Any]


class _Terminated(SystemExit):
    pass


_EXIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) inside the block (so ``finally``
    clauses run), where nobody else handles them; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_exit(signum: int, _frame: object) -> None:
        raise _Terminated(128 + signum)

    mine = [s for s in _EXIT_SIGNALS if signal.getsignal(s) is signal.SIG_DFL]
    for s in mine:
        signal.signal(s, raise_exit)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *,
                  inputs: Iterable[str | os.PathLike[str]] = (), flag: str = "output",
                  text: bool = False, fsync: bool = True) -> Iterator[AtomicOutput]:
    """Write ``path`` atomically: ``with atomic_output(p, inputs=[src]) as out:
    out.file.write(...)``. On a clean exit the temporary file is flushed, fsynced, renamed
    to ``path``, and the directory fsynced (so after a power loss ``path`` is the old file
    or the whole new one, never an empty or partly written one); ``fsync=False`` skips
    both fsyncs (a file nobody needs after a crash, e.g. a pid file). On any exception,
    Ctrl-C, SIGTERM or SIGHUP the temporary file is removed and ``path`` is left as it was.
    Checks :func:`check_output` first."""
    out = check_output(path, inputs, flag=flag)
    if is_special(out):  # /dev/stdout, /dev/null, a FIFO: written as it is, never replaced
        f = open(open_special(out, flag), "w" if text else "wb",  # noqa: SIM115
                 buffering=1 << 20, encoding="utf-8" if text else None)
        with f:
            yield AtomicOutput(out, out, f)
        return
    _sweep(out)
    fd = -1
    for _ in range(16):
        temp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = _create(temp)
            break
        except FileExistsError:
            continue
        except OSError as err:
            raise UsageError(f"cannot create {flag} {out}: {err.strerror}",
                             "give a writable path") from None
    if fd < 0:
        raise UsageError(f"cannot create a temporary file beside {out}", "retry")
    done = False
    try:
        with _sigterm_raises():
            f = open(fd, "w" if text else "wb", buffering=1 << 20,  # noqa: SIM115
                     encoding="utf-8" if text else None)
            try:
                try:
                    yield AtomicOutput(out, temp, f)
                    f.flush()
                    if fsync:
                        os.fsync(f.fileno())
                finally:
                    f.close()
                os.replace(temp, out)
                done = True
                if fsync:
                    _fsync_dir(out.parent)
            except OSError as err:
                if err.errno not in _WRITE_ERRORS:
                    raise
                was = "left as it was" if os.path.lexists(out) else "not created"
                raise OutputError(f"cannot write {out}: {err.strerror}; {out} {was}",
                                  "free space or write elsewhere") from None
    finally:
        if not done:
            with contextlib.suppress(OSError):
                temp.unlink()


def _fd_name(path: Path) -> int | None:
    """The fd that ``/dev/stdout``, ``/dev/stderr`` or ``/dev/fd/N`` names, else None."""
    name = os.fspath(path)
    if name in ("/dev/stdout", "/dev/stderr"):
        return 1 if name == "/dev/stdout" else 2
    m = re.fullmatch(r"/(?:dev|proc/self)/fd/(\d+)", name)
    return int(m.group(1)) if m else None


def is_special(path: Path) -> bool:
    """True if ``path`` names one of our fds (``/dev/stdout``), or exists and is a device,
    FIFO or socket (not followed if a link): written in place."""
    if _fd_name(path) is not None:
        return True
    try:
        mode = path.lstat().st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode))


def open_special(path: Path, flag: str = "output") -> int:
    """Open an existing device or FIFO (``/dev/null``, ``/dev/stdout``) to write in place:
    no temporary file, no rename (which would replace the device node)."""
    std = _fd_name(path)
    try:
        if std is not None:
            return os.dup(std)
        return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"cannot open {flag} {path}: {err.strerror}",
                         "give a writable path") from None


def create_partial(path: str | os.PathLike[str]) -> tuple[Path, int]:
    """A new ``NAME.PID.partial`` beside ``path`` (0600, O_EXCL|O_NOFOLLOW): (its path, an
    open write-only fd). UsageError (one line) if it cannot be created."""
    out = Path(path)
    base = f"{out.name}.{os.getpid()}"
    for n in range(16):
        temp = out.parent / (f"{base}.partial" if n == 0 else f"{base}.{n}.partial")
        try:
            return temp, _create(temp)
        except FileExistsError:
            continue
        except OSError as err:
            raise UsageError(f"cannot create {temp}: {err.strerror}",
                             "give a writable output path") from None
    raise UsageError(f"cannot create {base}.partial beside {out}: the names are taken",
                     "remove the old *.partial files")


def commit(temp: Path, path: str | os.PathLike[str], *, keep_old: bool = False) -> Path | None:
    """Rename the finished ``temp`` (already fsynced and closed) to ``path``; with
    ``keep_old`` an existing non-empty ``path`` becomes ``path.old`` first. Returns the
    ``.old`` path when one was made."""
    out = Path(path)
    old = None
    if keep_old:
        with contextlib.suppress(FileNotFoundError):
            st = out.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_size:
                old = out.with_name(out.name + ".old")
                os.replace(out, old)
    os.replace(temp, out)
    _fsync_dir(out.parent)
    return old


def _fsync_dir(directory: Path) -> None:
    """fsync a directory, so the renames in it survive a power loss (never raises: some
    file systems refuse fsync on a directory)."""
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def discard(temp: Path) -> None:
    """Remove a temporary file that will not be committed (never raises)."""
    with contextlib.suppress(OSError):
        temp.unlink()
