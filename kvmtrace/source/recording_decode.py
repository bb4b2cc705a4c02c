"""Decoder of one EVENTS block of a kvmtrace recording (the layout: :mod:`.recording_format`
and docs/FORMAT.md), to its columns as stored
(:class:`~kvmtrace.core.columns.EventColumns`, what replay reads) or to
:data:`~kvmtrace.core.events.EVENT_DTYPE` records.

Every step is a fixed number of numpy passes per column, no per-event Python; u32/u64
arithmetic wraps like the encoder's.
"""

from __future__ import annotations

import struct

import numpy as np

from ..core.columns import EventColumns, column_alloc
from .recording_format import (
    COLUMN_HEADER,
    DELTA_COLUMNS,
    EVENTS_HEADER,
    GROUP_DTYPE,
    MAX_BLOCK_EVENTS,
    MODE_DELTA,
    MODE_GROUP_CONST,
    STREAM_HEADER,
    STREAM_STORED,
    STREAM_ZLIB,
)
from .recording_limits import inflate

__all__ = ["decode_parts", "decode_events"]


class _Reader:
    """Cursor over a block payload."""

    def __init__(self, payload: bytes | bytearray | memoryview) -> None:
        self.buf = memoryview(payload)
        self.off = 0

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        vals = st.unpack_from(self.buf, self.off)
        self.off += st.size
        return vals

    def array(self, dtype: np.dtype | type, count: int) -> np.ndarray:
        arr = np.frombuffer(self.buf, dtype, count, self.off)
        self.off += arr.nbytes
        return arr

    def stream(self, expect: int) -> memoryview | bytes:
        codec, stored, raw = self.unpack(STREAM_HEADER)
        if raw != expect or self.off + stored > len(self.buf):
            raise ValueError("bad stream length")
        data = self.buf[self.off : self.off + stored]
        self.off += stored
        if codec == STREAM_STORED:
            return data
        if codec != STREAM_ZLIB:
            raise ValueError(f"unknown stream codec {codec}")
        return inflate(data, raw)


def _decode_delta(rd: _Reader, n: int, dtype: np.dtype, bits: int, npatch: int,
                  lo: int) -> np.ndarray:
    full = dtype.itemsize
    if bits > 8 * full:
        raise ValueError(f"bad column width {bits} bits")
    pos = vals = None
    if npatch > n:
        raise ValueError(f"{npatch} patches for {n} events")
    if npatch:
        raw = rd.stream(npatch * (4 + full))
        pos = np.frombuffer(raw, "<u4", npatch)
        vals = np.frombuffer(raw, dtype, npatch, 4 * npatch)
    try:
        lo_t = dtype.type(lo)
    except OverflowError:
        raise ValueError(f"column base {lo} out of range of {dtype}") from None
    nbytes, nbits = divmod(bits, 8)
    alloc = column_alloc()  # e.g. a replay worker's shared memory
    out = None if alloc is None else alloc(dtype, n)
    if nbytes:
        d = np.add(np.frombuffer(rd.stream(n), np.uint8), lo_t, dtype=dtype, out=out)
        for j in range(1, nbytes):
            plane = np.frombuffer(rd.stream(n), np.uint8)
            d += np.left_shift(plane, dtype.type(8 * j), dtype=dtype)
    elif out is not None:
        out.fill(lo_t)
        d = out
    else:
        d = np.full(n, lo_t, dtype)
    if nbits:
        top = np.zeros(n, np.uint8)
        for k in range(nbits):
            plane = np.unpackbits(np.frombuffer(rd.stream((n + 7) // 8), np.uint8), count=n)
            top |= plane << np.uint8(k)
        d += np.left_shift(top, dtype.type(8 * nbytes), dtype=dtype)
    if pos is not None:
        d[pos] = vals
    return np.cumsum(d, dtype=dtype, out=d)


def decode_parts(payload: bytes | bytearray | memoryview) -> EventColumns:
    """The parts of one EVENTS block payload; ValueError if it is malformed."""
    rd = _Reader(payload)
    try:
        n, ngroups, gid_width, ncols, _ = rd.unpack(EVENTS_HEADER)
        if ncols != len(DELTA_COLUMNS) or gid_width not in (0, 1, 2) or ngroups < 1:
            raise ValueError("bad block header")
        if n > MAX_BLOCK_EVENTS or ngroups > max(n, 1):
            raise ValueError(f"{n} events in {ngroups} groups (at most {MAX_BLOCK_EVENTS})")
        table = rd.array(GROUP_DTYPE, ngroups)
        gid = order = None
        if gid_width:
            gid = np.frombuffer(rd.stream(n * gid_width), f"<u{gid_width}")
            if len(gid) and int(gid.max()) >= ngroups:
                raise ValueError("bad group number")
            order = np.argsort(gid, kind="stable")
        grouped: dict[str, np.ndarray] = {}
        const: dict[str, np.ndarray] = {}
        ts = None
        for name, dtype, is_grouped in DELTA_COLUMNS:
            mode, width, _, npatch, lo = rd.unpack(COLUMN_HEADER)
            if mode == MODE_GROUP_CONST and is_grouped:
                const[name] = rd.array(dtype, ngroups)
            elif mode == MODE_DELTA:
                v = _decode_delta(rd, n, dtype, width, npatch, lo)
                if is_grouped:
                    grouped[name] = v
                else:
                    ts = v
            else:
                raise ValueError(f"bad column mode {mode}")
        if rd.off != len(rd.buf) or ts is None:
            raise ValueError("trailing bytes" if ts is not None else "no ts column")
    except (struct.error, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"malformed EVENTS block: {err}") from None
    return EventColumns(n, table, gid, order, ts, grouped, const)


def decode_events(payload: bytes | bytearray | memoryview) -> np.ndarray:
    """Events of one EVENTS block payload; ValueError if it is malformed."""
    parts = decode_parts(payload)
    try:
        return parts.events()
    except (ValueError, TypeError, IndexError) as err:
        raise ValueError(f"malformed EVENTS block: {err}") from None
