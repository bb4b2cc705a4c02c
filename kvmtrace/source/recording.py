"""kvmtrace recordings (``.kvt``): writer and reader of the file format in docs/FORMAT.md.

A recording is a file header followed by self-delimiting blocks, each with a length and a
CRC-32, appended with one ``write()`` each: META (the :class:`~.base.SourceMeta` as JSON,
the last one wins), EVENTS (a compressed columnar block of
:data:`~kvmtrace.core.events.EVENT_DTYPE` events, see :mod:`.recording_codec`), LOST
(cumulative count of events the producer could not deliver) and END (totals, written by
:meth:`RecordingWriter.close`). The writer writes ``NAME.PID.partial`` and renames it to
NAME when closed; a writer killed at any instant leaves that file readable up to its last
complete block; the reader ignores a torn tail and says so in :attr:`Recording.truncated`.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .. import __version__
from ..core.columns import EventColumns
from ..core.counters import VmName
from ..core.events import EVENT_DTYPE
from ..core.sources import EventSource, SourceMeta
from ..errors import OutputError, UsageError
from ..host.outfile import (
    check_output,
    commit,
    create_partial,
    discard,
    is_special,
    open_special,
)
from .recording_codec import BlockBuffer, encode_block
from .recording_decode import decode_parts
from .recording_format import EVENTS_HEADER, GROUP_DTYPE, MAX_BLOCK_EVENTS
from .recording_limits import (
    MAX_JSON_BYTES,
    check_end,
    check_meta,
    events_raw_limit,
    inflate,
    load_json,
)

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "BlockType",
    "RecordingWriter",
    "Recording",
    "open_recording",
    "is_recording",
    "meta_to_dict",
    "meta_from_dict",
]

MAGIC = b"\x89KVT\r\n\x1a\n"
# (major, minor): a reader refuses a newer major; 1.1: vm packs a gen; 1.2: meta "vms"
FORMAT_VERSION = (1, 2)
FILE_HEADER = struct.Struct("<8sHHI")  # magic, major, minor, flags
BLOCK_HEADER = struct.Struct("<4sBBHIIIQQI")  # see docs/FORMAT.md
BLOCK_SYNC = b"KTBK"
MAX_RAW_BYTES = 1 << 28  # refuse blocks that would inflate beyond 256 MiB


class BlockType:
    META = 1
    EVENTS = 2
    LOST = 3
    END = 4


_CODEC_NONE, _CODEC_ZLIB = 0, 1
_BLOCK_NAMES = {1: "META", 2: "EVENTS", 3: "LOST", 4: "END"}
_LOST = struct.Struct("<Q")


def _header_at(f: Any, pos: int) -> tuple[bytes, tuple[Any, ...]] | None:
    """The block header at ``pos`` of file ``f``, raw and unpacked; None past the end."""
    f.seek(pos)
    head = f.read(BLOCK_HEADER.size)
    if len(head) < BLOCK_HEADER.size:
        return None
    return head, BLOCK_HEADER.unpack(head)


def meta_to_dict(meta: SourceMeta) -> dict[str, Any]:
    """SourceMeta as JSON-safe data; ring_entries becomes [[pid, vm, entries], ...] and
    vms ``[{"pid", "vm", "vmm", "name", "comm"}, ...]`` (format 1.2, docs/FORMAT.md)."""
    d = asdict(meta)
    d["ring_entries"] = [[int(p), int(v), int(e)] for (p, v), e in meta.ring_entries.items()]
    d["vms"] = [{"pid": int(p), "vm": int(v), "vmm": n.vmm, "name": n.name, "comm": n.comm}
                for (p, v), n in sorted(meta.vms.items())]
    return d


def _vms_from(items: Any) -> dict[tuple[int, int], VmName]:
    """The meta's ``vms`` list back as a dict; entries not shaped as written are skipped."""
    out: dict[tuple[int, int], VmName] = {}
    for it in items if isinstance(items, list) else []:
        try:
            key = (int(it["pid"]), int(it["vm"]))
        except (TypeError, KeyError, ValueError):
            continue
        vmm, name, comm = it.get("vmm"), it.get("name"), it.get("comm")
        out[key] = VmName(vmm=vmm if isinstance(vmm, str) else None,
                          name=name if isinstance(name, str) else None,
                          comm=comm if isinstance(comm, str) else "")
    return out


def meta_from_dict(d: dict[str, Any]) -> SourceMeta:
    """Inverse of :func:`meta_to_dict` (unknown keys land in ``extra``)."""
    known = {"kind", "kernel_release", "host", "start_time", "hooks", "tracepoint_formats",
             "ring_entries", "extra", "vms"}
    extra = dict(d.get("extra") or {})
    extra.update({k: v for k, v in d.items() if k not in known})
    return SourceMeta(
        kind=str(d.get("kind", "recording")),
        kernel_release=d.get("kernel_release"),
        host=d.get("host"),
        start_time=d.get("start_time"),
        hooks=dict(d.get("hooks") or {}),
        tracepoint_formats=dict(d.get("tracepoint_formats") or {}),
        ring_entries={(int(p), int(v)): int(e) for p, v, e in d.get("ring_entries") or []},
        extra=extra,
        vms=_vms_from(d.get("vms")),
    )


def _block(btype: int, payload: bytes, count: int = 0, ts_min: int = 0, ts_max: int = 0,
           level: int = 6) -> bytes:
    codec = _CODEC_NONE
    stored = payload
    if level > 0:
        stored = zlib.compress(payload, level)
        codec = _CODEC_ZLIB
    head = BLOCK_HEADER.pack(BLOCK_SYNC, btype, codec, 0, len(stored), len(payload), count,
                             ts_min, ts_max, 0)[:-4]
    crc = zlib.crc32(stored, zlib.crc32(head))
    return head + struct.pack("<I", crc) + stored


class RecordingWriter:
    """Writes events to a recording at ``path`` (replaced when complete).

    The file is written as ``NAME.PID.partial`` beside ``path`` (mode 0600, created with
    O_EXCL|O_NOFOLLOW; :mod:`kvmtrace.host.outfile`) and renamed to ``path`` by
    :meth:`close`; a writer killed with SIGKILL leaves the ``.partial`` file, readable up to
    its last complete block, and ``path`` untouched.

    ``write()`` buffers; a block is encoded and written once ``block_events`` events are
    pending or on ``flush()``. Call ``flush()`` at least once a second so that a SIGKILL
    loses at most the last second. ``close()`` (or leaving a ``with`` block, also through
    KeyboardInterrupt/SystemExit) writes the END block; make SIGTERM raise SystemExit to get
    a clean close on it. ``fsync=True`` also survives power loss, at a cost per flush.

    Pending events live in one preallocated block buffer, field by field
    (:class:`~.recording_codec.BlockBuffer`: each batch is split into columns as it comes,
    while it is in the CPU's cache, and the encoder reads only columns). ``level``: zlib
    level of the EVENTS streams and META; 2 costs about half the CPU of 3 for ~1.5 % more
    bytes on a live recording.
    """

    def __init__(self, path: str | os.PathLike[str], meta: SourceMeta, *,
                 block_events: int = 1 << 16, level: int = 2, fsync: bool = False,
                 keep_old: bool = False) -> None:
        self.path = Path(path)
        self.meta = meta_from_dict(meta_to_dict(meta))  # a private copy
        self.block_events = min(max(1, int(block_events)), MAX_BLOCK_EVENTS)
        self.level = level
        self.fsync = fsync
        self.events = 0
        self.lost = 0
        self.blocks = 0
        self.bytes_written = 0
        self.ts_first: int | None = None
        self.ts_last: int | None = None
        self._buf = BlockBuffer(self.block_events)  # pending events
        self._lost_written = 0
        self._meta_dirty = False
        self._created = time.time()
        self._failed: OutputError | None = None
        self.keep_old = keep_old
        #: ``path.old`` once close() moved an earlier recording there (``keep_old=True``)
        self.old: Path | None = None
        check_output(self.path, flag="recording")
        if is_special(self.path):  # /dev/null, a FIFO: written in place, never renamed over
            self.temp: Path | None = None
            fd = open_special(self.path, "recording")
        else:
            self.temp, fd = create_partial(self.path)  # 0600, O_EXCL|O_NOFOLLOW
        self._fd: int | None = fd
        try:
            self._write(FILE_HEADER.pack(MAGIC, *FORMAT_VERSION, 0))
            self._write_meta()
        except BaseException:
            self._fd = None
            os.close(fd)
            if self.temp is not None:
                discard(self.temp)
            raise

    # -- public API -------------------------------------------------------------------
    def write(self, events: np.ndarray) -> None:
        """Queue events (EVENT_DTYPE, in time order); writes full blocks as they fill."""
        self._check_open()
        ev = np.asarray(events)
        if ev.dtype != EVENT_DTYPE:
            raise UsageError(f"cannot record events of dtype {ev.dtype}",
                             "pass arrays of kvmtrace.core.events.EVENT_DTYPE")
        ev = ev.reshape(-1)
        b = self.block_events
        while len(ev):
            take = min(b - len(self._buf), len(ev))
            self._buf.put(ev[:take])
            ev = ev[take:]
            if len(self._buf) == b:
                self._write_events()

    def add_lost(self, n: int) -> None:
        """Count ``n`` more events the producer could not deliver."""
        self.lost += int(n)

    def update_meta(self, **fields: Any) -> None:
        """Change meta fields learnt later (e.g. ``ring_entries={(pid, vm): 512}``).

        Dict fields (ring_entries, hooks, tracepoint_formats, extra) are merged, the others
        replaced. Written at the next flush.
        """
        for name, value in fields.items():
            if not hasattr(self.meta, name) or name == "kind":
                raise TypeError(f"update_meta: unknown SourceMeta field {name!r}")
            current = getattr(self.meta, name)
            if isinstance(current, dict):
                current.update(value)
            else:
                setattr(self.meta, name, value)
        self._meta_dirty = True

    def flush(self) -> None:
        """Write everything pending (events, lost events count, meta) as complete blocks."""
        self._check_open()
        self._write_events()
        if self.lost != self._lost_written:
            self._write(_block(BlockType.LOST, _LOST.pack(self.lost), level=0))
            self._lost_written = self.lost
        if self._meta_dirty:
            self._write_meta()
        if self.fsync:
            assert self._fd is not None
            os.fsync(self._fd)

    def close(self) -> None:
        """Flush, write the END block with totals, fsync and rename the ``.partial`` file
        to ``path`` (with ``keep_old``, an existing non-empty ``path`` becomes ``path.old``
        first). After a write error the file, cut back to its last whole block, is renamed
        all the same: it is all there is. Safe to call twice."""
        if self._fd is None:
            return
        fd = self._fd
        try:
            if not self._failed:  # else the file ends at its last whole block: leave it so
                self.flush()
                end = {"events": self.events, "lost": self.lost, "blocks": self.blocks,
                       "ts_first": self.ts_first, "ts_last": self.ts_last,
                       "end_time": time.time()}
                self._write(_block(BlockType.END, json.dumps(end).encode(), level=0))
        finally:
            self._fd = None
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.close(fd)
            try:
                if self.temp is not None:
                    self.old = commit(self.temp, self.path, keep_old=self.keep_old)
            except OSError as err:
                raise OutputError(f"cannot rename {self.temp} to {self.path}: {err.strerror}",
                                  f"the recording is {self.temp}") from None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._fd is None:
            raise ValueError("recording writer is closed")

    def _write(self, data: bytes) -> None:
        """Append one whole block; on a write error (disk full, I/O error) cut the file back
        to the end of the last whole block, so it stays readable, and stop writing."""
        if self._failed:
            raise self._failed
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as err:
            try:
                os.ftruncate(self._fd, self.bytes_written)
            except OSError:
                pass
            self._failed = OutputError(
                f"cannot write {self.path}: {err.strerror}; the recording ends after "
                f"{self.events} events", "free space or record elsewhere; "
                "'kvmtrace replay' reads what the file holds")
            raise self._failed from None
        self.bytes_written += len(data)

    def _write_meta(self) -> None:
        d = meta_to_dict(self.meta)
        d["extra"] = dict(d["extra"])
        d["extra"].setdefault("source_kind", self.meta.kind)
        d.update(kind="recording", format="kvmtrace-recording",
                 format_version=list(FORMAT_VERSION), writer=f"kvmtrace {__version__}",
                 created=self._created)
        if self.meta.host is None:
            d["host"] = socket.gethostname()
        if self.meta.kernel_release is None:
            d["kernel_release"] = os.uname().release
        if self.meta.start_time is None:
            d["start_time"] = self._created
        payload = json.dumps(d, default=str, sort_keys=True).encode()
        self._write(_block(BlockType.META, payload, level=self.level))
        self._meta_dirty = False

    def _write_events(self) -> None:
        """Encode and write the pending events (at most one block)."""
        if len(self._buf):
            self._write_block(self._buf)

    def _write_block(self, buf: BlockBuffer) -> None:
        payload = encode_block(buf, self.level)
        n = len(buf)
        ts = buf["ts"]
        lo, hi = int(ts.min()), int(ts.max())
        buf.clear()
        self._write(_block(BlockType.EVENTS, payload, n, lo, hi, level=0))
        self.events += n
        self.blocks += 1
        self.ts_first = lo if self.ts_first is None else min(self.ts_first, lo)
        self.ts_last = hi if self.ts_last is None else max(self.ts_last, hi)


class Recording(EventSource):
    """A recording opened for reading; an EventSource (kvmtrace/core/sources.py).

    Known at open (one pass over block headers): ``meta``, ``events`` (complete events),
    ``lost`` (lost events), ``blocks``, ``ts_first``/``ts_last`` (ns), ``complete`` (END
    block present), ``truncated`` (no END block: the writer was killed, or the file was cut) and
    ``torn_bytes`` (bytes of an incomplete last block, ignored).

    ``skip_damaged``: damage in the middle of the file (a block whose CRC fails, a header
    without the sync word, a malformed block) is skipped instead of being a format error:
    the reader resyncs at the next valid block header (sync word, sane header, matching
    CRC) and reads on. Every EVENTS block's CRC is then checked at open, so ``events``
    counts only sound blocks; ``skipped`` lists (offset, bytes, declared events) of each
    skip and :attr:`warnings` says it in one line.
    """

    def __init__(self, path: str | os.PathLike[str], *, name: str | None = None,
                 skip_damaged: bool = False) -> None:
        self.path = Path(path)
        self.name = name or str(path)  #: what messages call the file (``-``: stdin)
        self.skip_damaged = skip_damaged
        #: (offset, bytes, events its header declared or 0) of damage skipped
        self.skipped: list[tuple[int, int, int]] = []
        self._resync_budget = 0  # bytes a resync may still check (set by _scan)
        self.meta = SourceMeta(kind="recording")
        self.version: tuple[int, int] = (0, 0)
        self.events = 0
        self.blocks = 0
        self.complete = False
        self.torn_bytes = 0
        self.ts_first: int | None = None
        self.ts_last: int | None = None
        self.end: dict[str, Any] | None = None
        self._lost = 0
        self._index: list[tuple[int, int]] = []  # (offset of header, events) of EVENTS blocks
        self._warnings: list[str] = []
        self.trailing_bytes = 0  #: bytes after the END block (ignored, with a warning)
        self._scan()

    @property
    def lost(self) -> int:
        return self._lost

    @property
    def truncated(self) -> bool:
        return not self.complete

    def batches(self) -> Iterator[np.ndarray]:
        """Events block by block, in file order (= time order), one block in memory."""
        for parts in self.column_batches():
            yield parts.events()

    def column_batches(self) -> Iterator[EventColumns]:
        """As :meth:`batches`, each block as its columns
        (:class:`~kvmtrace.core.columns.EventColumns`, group-major, as stored), without
        building EVENT_DTYPE records: what replay reads."""
        return self.column_blocks()

    def column_blocks(self, start: int = 0, step: int = 1) -> Iterator[EventColumns]:
        """As :meth:`column_batches`, blocks ``start``, ``start + step``, ... only (the
        share of one of ``step`` readers; the others are not read)."""
        with open(self.path, "rb", buffering=0) as f:
            for offset, count in self._index[start::step]:
                f.seek(offset)
                head = f.read(BLOCK_HEADER.size)
                fields = BLOCK_HEADER.unpack(head)
                stored = f.read(fields[4])
                try:
                    parts = self._decode_parts(offset, head, fields, stored)
                except UsageError:
                    if not self.skip_damaged:
                        raise
                    self.skipped.append((offset, len(head) + len(stored), count))
                    self.events -= count
                    continue
                yield parts

    def group_tables(self) -> Iterator[tuple[int, np.ndarray | None]]:
        """Each EVENTS block's number of events and group table (the distinct (pid, tid,
        vm, ring, kind) of its events, :data:`~.recording_format.GROUP_DTYPE`), in file
        order, read without decoding the block and without its CRC check: for planning a
        reader's work (a replay on every core). The table is None for a block whose table
        cannot be read so."""
        with open(self.path, "rb", buffering=0) as f:
            for offset, count in self._index:
                f.seek(offset)
                head = f.read(BLOCK_HEADER.size + EVENTS_HEADER.size)
                try:
                    fields = BLOCK_HEADER.unpack_from(head)
                    n, ngroups = EVENTS_HEADER.unpack_from(head, BLOCK_HEADER.size)[:2]
                except struct.error:
                    yield count, None
                    continue
                if fields[2] != _CODEC_NONE or not 0 < ngroups <= max(n, 1) or \
                        EVENTS_HEADER.size + ngroups * GROUP_DTYPE.itemsize > fields[4]:
                    yield count, None
                    continue
                raw = f.read(ngroups * GROUP_DTYPE.itemsize)
                ok = len(raw) == ngroups * GROUP_DTYPE.itemsize
                yield count, np.frombuffer(raw, GROUP_DTYPE) if ok else None

    def read_all(self) -> np.ndarray:
        """Every event at once (unbounded memory: for small recordings and tests)."""
        parts = list(self.batches())
        return np.concatenate(parts) if parts else np.empty(0, EVENT_DTYPE)

    # -- internals ---------------------------------------------------------------------
    def _fail(self, what: str) -> UsageError:
        return UsageError(f"{self.name}: {what}",
                          "give a recording written by 'kvmtrace record'")

    def _scan(self) -> None:
        try:
            f = open(self.path, "rb")
        except OSError as err:
            raise UsageError(f"cannot open {self.name}: {err.strerror}",
                             "check the path") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(FILE_HEADER.size)
            if head[: len(MAGIC)] != MAGIC[: len(head)] or len(head) < len(MAGIC):
                raise self._fail("not a kvmtrace recording (bad magic bytes)")
            if len(head) < FILE_HEADER.size:
                self.torn_bytes = len(head)
                return
            _, major, minor, _ = FILE_HEADER.unpack(head)
            if major > FORMAT_VERSION[0]:
                raise UsageError(
                    f"{self.name}: recording format {major}.{minor} is newer than this "
                    f"kvmtrace reads ({FORMAT_VERSION[0]}.x)", "upgrade kvmtrace")
            self.version = (major, minor)
            pos = FILE_HEADER.size
            self._resync_budget = 16 * size + (64 << 20)
            while pos < size:
                if self.complete:
                    self._trailing(f, pos, size)
                    break
                try:
                    ok = self._scan_block(f, pos, size)
                except UsageError:
                    if not self.skip_damaged:
                        raise
                    nxt = self._resync(f, pos + 1, size)
                    self.skipped.append((pos, nxt - pos, self._declared(f, pos)))
                    pos = nxt
                    continue
                if not ok:
                    self.torn_bytes = size - pos
                    break
                pos = f.tell()
            if self.end is not None:
                self._lost = max(self._lost, int(self.end.get("lost", 0)))

    @property
    def warnings(self) -> list[str]:
        """One line each: data after the END block (another recording, or garbage);
        damage skipped (``skip_damaged``): blocks, bytes and their offsets."""
        out = list(self._warnings)
        if self.skipped:
            n, total = len(self.skipped), sum(b for _, b, _ in self.skipped)
            if n == 1:
                what = f"1 damaged block ({total} bytes) at byte {self.skipped[0][0]}"
            else:
                at = ", ".join(f"{o} ({b} bytes)" for o, b, _ in self.skipped[:10])
                what = (f"{n} damaged blocks ({total} bytes) at bytes {at}"
                        + (f" and {n - 10} more" if n > 10 else ""))
            out.append(f"{self.name}: skipped {what} (--skip-damaged); read the rest")
        return out

    def _declared(self, f: Any, pos: int) -> int:
        """The events the EVENTS block header at ``pos`` declares (0: another block, or a
        header not to be trusted with a count)."""
        got = _header_at(f, pos)
        if got is None:
            return 0
        fields = got[1]
        ok = fields[0] == BLOCK_SYNC and fields[1] == BlockType.EVENTS
        return fields[6] if ok and 0 < fields[6] <= MAX_BLOCK_EVENTS else 0

    def _resync(self, f: Any, start: int, size: int) -> int:
        """The offset of the next valid block at or after ``start`` (sync word, a header
        within the limits, the whole block in the file and its CRC right), else ``size``.
        The bytes checked over the whole file are bounded (a few times its size), so a
        file of false sync words costs linear time; past that the rest is skipped."""
        pos = start
        while pos < size:
            f.seek(pos)
            chunk = f.read(min(1 << 20, size - pos))
            if not chunk:
                break
            i = chunk.find(BLOCK_SYNC)
            while i >= 0:
                if self._valid_at(f, pos + i, size):
                    return pos + i
                if self._resync_budget <= 0:
                    return size
                i = chunk.find(BLOCK_SYNC, i + 1)
            pos += max(1, len(chunk) - len(BLOCK_SYNC) + 1)
        return size

    def _valid_at(self, f: Any, pos: int, size: int) -> bool:
        self._resync_budget -= BLOCK_HEADER.size
        got = _header_at(f, pos)
        if got is None:
            return False
        head, fields = got
        _, btype, codec, _, stored_len, raw_len, count, ts_min, ts_max, crc = fields
        if btype not in _BLOCK_NAMES or codec > _CODEC_ZLIB:
            return False
        if pos + BLOCK_HEADER.size + stored_len > size:
            return False
        try:
            self._check_sizes(pos, btype, codec, stored_len, raw_len, count, ts_min, ts_max)
        except UsageError:
            return False
        self._resync_budget -= stored_len
        return zlib.crc32(f.read(stored_len), zlib.crc32(head[:-4])) == crc

    def _trailing(self, f: Any, pos: int, size: int) -> None:
        """Bytes after the END block: ignored, and said (FORMAT.md, "Reading rules")."""
        self.trailing_bytes = size - pos
        f.seek(pos)
        what = ("another recording" if f.read(len(MAGIC)) == MAGIC
                else "data that is not part of the recording")
        self._warnings.append(
            f"{self.name}: {self.trailing_bytes} bytes after the END block, from byte {pos} "
            f"({what}), ignored")

    def _format_error(self, pos: int, what: str) -> UsageError:
        return self._fail(f"damaged recording: {what} at byte {pos}")

    @staticmethod
    def _zero_tail(f: Any, pos: int, size: int) -> bool:
        """True if the file is all zeros from ``pos``: what a power loss leaves of blocks
        whose data never reached the disk (read in bounded pieces)."""
        f.seek(pos)
        while pos < size:
            chunk = f.read(min(1 << 20, size - pos))
            if not chunk or chunk.count(0) != len(chunk):
                return not chunk
            pos += len(chunk)
        return True

    def _scan_block(self, f: Any, pos: int, size: int) -> bool:
        """Index the block at ``pos``; False if it is a torn tail (the block runs past the
        end of the file, or it is the last block and its CRC fails); a format error naming
        the offset if a block in the middle is damaged or malformed."""
        got = _header_at(f, pos)
        if got is None:
            return False
        head, fields = got
        sync, btype, codec, _, stored_len, raw_len, count, ts_min, ts_max, _ = fields
        end = pos + BLOCK_HEADER.size + stored_len
        if sync != BLOCK_SYNC or btype not in _BLOCK_NAMES or codec > _CODEC_ZLIB:
            if self._zero_tail(f, pos, size):
                return False
            what = ("no block sync word" if sync != BLOCK_SYNC else
                    f"unknown block type {btype}" if btype not in _BLOCK_NAMES else
                    f"unknown block codec {codec}")
            raise self._format_error(pos, what)
        if end > size:
            return False
        self._check_sizes(pos, btype, codec, stored_len, raw_len, count, ts_min, ts_max)
        if btype == BlockType.EVENTS and end < size and not self.skip_damaged:
            f.seek(end)  # not the last block: its CRC is checked when it is decoded
        else:
            stored = f.read(stored_len)
            try:
                payload = self._payload(pos, head, fields, stored)
            except UsageError:
                if end == size:
                    return False  # the last block: as a killed writer leaves it
                raise
            if btype == BlockType.META:
                d = self._parse_json(pos, payload, "META", check_meta)
                try:
                    self.meta = meta_from_dict(d)
                except (TypeError, ValueError, AttributeError, OverflowError):
                    raise self._format_error(pos, "malformed META block") from None
            elif btype == BlockType.LOST:
                self._lost = _LOST.unpack(payload)[0]
            elif btype == BlockType.END:
                self.end = self._parse_json(pos, payload, "END", check_end)
                self.complete = True
        if btype == BlockType.EVENTS:
            self._index.append((pos, count))
            self.events += count
            self.blocks += 1
            self.ts_first = ts_min if self.ts_first is None else min(self.ts_first, ts_min)
            self.ts_last = ts_max if self.ts_last is None else max(self.ts_last, ts_max)
        return True

    def _check_sizes(self, pos: int, btype: int, codec: int, stored_len: int, raw_len: int,
                     count: int, ts_min: int, ts_max: int) -> None:
        """What the header declares, within what the format allows (a format error)."""
        if btype == BlockType.EVENTS:
            if not 0 < count <= MAX_BLOCK_EVENTS:
                raise self._format_error(
                    pos, f"EVENTS block of {count} events (1 to {MAX_BLOCK_EVENTS})")
            if ts_min > ts_max:
                raise self._format_error(pos, "EVENTS block whose ts_min > ts_max")
            limit = events_raw_limit(count)
        elif btype == BlockType.LOST:
            limit = _LOST.size
            if raw_len != limit:
                raise self._format_error(pos, f"LOST block of {raw_len} bytes (8)")
        else:
            limit = MAX_JSON_BYTES
        if raw_len > limit or (codec == _CODEC_NONE and raw_len != stored_len):
            raise self._format_error(
                pos, f"{_BLOCK_NAMES[btype]} block declaring {raw_len} bytes (at most "
                f"{limit})")

    def _parse_json(self, pos: int, payload: bytes, what: str,
                    check: Any) -> dict[str, Any]:
        try:
            d = load_json(payload)
            check(d)
        except ValueError as err:
            raise self._format_error(pos, f"malformed {what} block ({err})") from None
        return d

    def _payload(self, pos: int, head: bytes, fields: tuple[Any, ...], stored: bytes) -> bytes:
        _, _, codec, _, stored_len, raw_len, _, _, _, crc = fields
        if len(stored) != stored_len or zlib.crc32(stored, zlib.crc32(head[:-4])) != crc:
            raise self._fail(f"damaged {_BLOCK_NAMES.get(fields[1], 'unknown')} block at byte "
                             f"{pos} (CRC mismatch)")
        if codec == _CODEC_NONE:
            return stored
        try:
            return inflate(stored, raw_len)
        except ValueError as err:
            raise self._fail(f"damaged {_BLOCK_NAMES.get(fields[1], 'unknown')} block at byte "
                             f"{pos} ({err})") from None

    def _decode_parts(self, pos: int, head: bytes, fields: tuple[Any, ...],
                      stored: bytes) -> EventColumns:
        payload = self._payload(pos, head, fields, stored)
        try:
            parts = decode_parts(payload)
        except ValueError as err:
            raise self._fail(f"block at byte {pos}: {err}") from None
        if parts.n != fields[6]:
            raise self._fail(f"block at byte {pos}: {parts.n} events, header says {fields[6]}")
        return parts


def open_recording(path: str | os.PathLike[str], *, name: str | None = None,
                   skip_damaged: bool = False) -> Recording:
    """Open a recording; UsageError (one line) if it is missing or not a recording.
    ``name``: what messages call it (default: the path); ``skip_damaged``: see
    :class:`Recording`."""
    return Recording(path, name=name, skip_damaged=skip_damaged)


def is_recording(path: str | os.PathLike[str]) -> bool:
    """True if the file starts with the recording magic bytes (never raises)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
