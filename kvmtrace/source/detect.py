"""Open a trace file whatever it is: a kvmtrace recording, tracefs text or ``perf script``.

Detection looks at the first MiB: the recording magic bytes; else the first line that
prints a dirty-ring event decides between ``perf script`` (``kvm:kvm_dirty_ring_...`` after
``comm tid [cpu] time:``) and tracefs (``comm-tid [cpu] flags time: kvm_dirty_ring_...``,
or a ``# tracer:`` header). Anything else is a :class:`~kvmtrace.errors.UsageError`.
"""

from __future__ import annotations

import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO

from ..core.sources import EventSource
from ..errors import KvmtraceError, UsageError
from .ftrace import FtraceSource
from .perfscript import PerfScriptSource
from .textsource import resolve_ring_entries

__all__ = ["open_source", "detect_format", "stream_path"]

HEAD_BYTES = 1 << 20
RECORDING_MAGIC = b"\x89KVT\r\n\x1a\n"  # also kvmtrace.source.recording.MAGIC
_PERF_LINE = re.compile(
    rb"^[ \t]*\S[^\n]*?[ \t]\d+(?:/\d+)?[ \t]+(?:\[\d+\][ \t]+)?\d+\.\d+:[ \t]+"
    rb"(?:\d+[ \t]+)?kvm:kvm_(?:dirty_ring_|userspace_exit)", re.M)
_FTRACE_LINE = re.compile(
    rb"^[^\n]*?-\d+[ \t]+(?:\([ \t]*[\d-]+\)[ \t]+)?\[\d+\][^\n]*?\d+\.\d+: "
    rb"kvm_(?:dirty_ring_|userspace_exit)", re.M)


def detect_format(path: str | os.PathLike[str], *, name: str | None = None) -> str:
    """"recording", "ftrace" or "perf-script"; UsageError when it is none of them.
    ``name``: what messages call the file (default: the path)."""
    p = Path(path)
    shown = name or str(path)
    try:
        with open(p, "rb") as f:
            head = f.read(HEAD_BYTES)
    except IsADirectoryError:
        raise UsageError(f"{shown} is a directory", "give a trace file") from None
    except OSError as err:
        raise UsageError(f"cannot read {shown}: {err.strerror}", "give a readable file") from None
    if head.startswith(RECORDING_MAGIC):
        return "recording"
    if head.startswith(b"PERFILE2"):
        raise UsageError(f"{shown} is a perf.data file",
                         f"convert it first: perf script -i {p} > {p}.txt")
    if b"\0" in head[:4096]:
        raise UsageError(f"{shown} is neither a kvmtrace recording nor trace text",
                         "give a .kvt recording, a tracefs trace or perf script output")
    pm, fm = _PERF_LINE.search(head), _FTRACE_LINE.search(head)
    if pm and (not fm or pm.start() <= fm.start()):
        return "perf-script"
    if fm or head.lstrip().startswith(b"# tracer:"):
        return "ftrace"
    raise UsageError(f"no dirty-ring events recognised at the start of {shown}",
                     "trace kvm:kvm_dirty_ring_push/reset/exit with tracefs or perf, or "
                     "record with 'kvmtrace record'")


_SPOOLED: dict[str, int] = {}  # stream name -> fd of its unnamed copy (kept open)


def stream_path(path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """``path`` itself for a regular file (or one that cannot be stat'ed: the reader says
    why); for ``-`` (stdin), a FIFO, a socket or a character device, a path to an unnamed
    copy of the stream (``O_TMPFILE`` in the temporary directory, mode 0600, gone when the
    process ends), read once to its end in 1 MiB pieces: readers need to seek and read a
    file twice, a stream can be read only once."""
    name = os.fspath(path)
    if name in _SPOOLED:
        return f"/proc/self/fd/{_SPOOLED[name]}"
    if name != "-":
        try:
            mode = os.stat(name).st_mode
        except OSError:
            return path
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            return path
    try:
        out = os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as err:
        raise UsageError(f"cannot keep a copy of {name}: {err.strerror}",
                         "save the trace to a file first, then give its path") from None
    try:
        if name == "-":
            _copy(sys.stdin.buffer, out)
        else:
            with open(name, "rb", buffering=0) as src:
                _copy(src, out)
    except OSError as err:
        os.close(out)
        raise UsageError(f"cannot read {'stdin' if name == '-' else name}: {err.strerror}",
                         "save the trace to a file first, then give its path") from None
    _SPOOLED[name] = out
    return f"/proc/self/fd/{out}"


def _copy(src: BinaryIO, fd: int) -> None:
    while chunk := src.read(1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


def open_source(path: str | os.PathLike[str], *, ring_entries: int | None = None,
                ring_bytes: int | None = None, skip_damaged: bool = False) -> EventSource:
    """An EventSource for ``path``; ``-`` is stdin, and stdin, FIFOs and other streams
    are read once to their end (:func:`stream_path`). ``ring_entries``/``ring_bytes``
    give the ring size when the trace does not (a default for every VM:
    meta.ring_entries[(-1, -1)]). ``skip_damaged``: a recording's damaged blocks mid-file
    are skipped and counted, not a format error (:class:`.recording.Recording`; text
    traces already skip and count lines they cannot parse)."""
    name = "stdin" if os.fspath(path) == "-" else str(path)
    path = stream_path(path)
    fmt = detect_format(path, name=name)
    if fmt == "ftrace":
        return FtraceSource(path, ring_entries=ring_entries, ring_bytes=ring_bytes,
                            name=name)
    if fmt == "perf-script":
        return PerfScriptSource(path, ring_entries=ring_entries, ring_bytes=ring_bytes,
                                name=name)
    entries = resolve_ring_entries(ring_entries, ring_bytes)
    try:
        from .recording import open_recording
    except ImportError as err:
        raise KvmtraceError(f"{path} is a kvmtrace recording but this build cannot read "
                            f"recordings ({err})",
                            "update kvmtrace (kvmtrace.source.recording is missing)"
                            ) from None
    src = open_recording(path, name=name, skip_damaged=skip_damaged)
    if entries:
        src.meta.ring_entries.setdefault((-1, -1), entries)
    return src
