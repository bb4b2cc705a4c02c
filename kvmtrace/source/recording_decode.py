"""Decoder of one EVENTS block of a kvmtrace recording (the layout: :mod:`.recording_codec`
and docs/FORMAT.md), to its columns as stored (:class:`BlockParts`, what replay reads) or
to :data:`~kvmtrace.core.events.EVENT_DTYPE` records.

Every step is a fixed number of numpy passes per column, no per-event Python; u32/u64
arithmetic wraps like the encoder's.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from ..core.events import EVENT_DTYPE
from .recording_codec import (
    _BLOCK,
    _COLUMN,
    _DIRTY_RESET,
    _KEYS,
    _MODE_DELTA,
    _MODE_GROUP_CONST,
    _STREAM,
    DELTA_COLUMNS,
    GROUP_DTYPE,
)

__all__ = ["BlockParts", "decode_parts", "decode_events"]


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
        codec, stored, raw = self.unpack(_STREAM)
        if raw != expect or self.off + stored > len(self.buf):
            raise ValueError("bad stream length")
        data = self.buf[self.off : self.off + stored]
        self.off += stored
        if codec == 0:
            return data
        if codec != 1:
            raise ValueError(f"unknown stream codec {codec}")
        try:
            out = zlib.decompress(data, bufsize=max(raw, 1))
        except zlib.error as err:
            raise ValueError(f"bad zlib stream: {err}") from None
        if len(out) != raw:
            raise ValueError("bad stream length")
        return out


def _decode_delta(rd: _Reader, n: int, dtype: np.dtype, bits: int, npatch: int,
                  lo: int) -> np.ndarray:
    full = dtype.itemsize
    if bits > 8 * full:
        raise ValueError(f"bad column width {bits} bits")
    pos = vals = None
    if npatch:
        raw = rd.stream(npatch * (4 + full))
        pos = np.frombuffer(raw, "<u4", npatch)
        vals = np.frombuffer(raw, dtype, npatch, 4 * npatch)
    lo_t = dtype.type(lo)
    nbytes, nbits = divmod(bits, 8)
    if nbytes:
        d = np.add(np.frombuffer(rd.stream(n), np.uint8), lo_t, dtype=dtype)
        for j in range(1, nbytes):
            plane = np.frombuffer(rd.stream(n), np.uint8)
            d += np.left_shift(plane, dtype.type(8 * j), dtype=dtype)
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


@dataclass
class BlockParts:
    """One decoded EVENTS block before it becomes records: the group table, each event's
    group number in time order (None: one group), ``ts`` in time order, and the grouped
    columns group-major (``grouped``: n values, events taken group by group) or, when
    constant within every group, once per group (``const``: ngroups values)."""

    n: int
    table: np.ndarray  # GROUP_DTYPE
    gid: np.ndarray | None  # u1/u2, time order
    order: np.ndarray | None  # argsort(gid, stable): time position of each group-major event
    ts: np.ndarray  # u64 ns, time order
    grouped: dict[str, np.ndarray]
    const: dict[str, np.ndarray]

    def events(self) -> np.ndarray:
        """The block as EVENT_DTYPE records."""
        tmpl = np.zeros(len(self.table), EVENT_DTYPE)
        for key in _KEYS:
            tmpl[key] = self.table[key]
        for name, v in self.const.items():
            tmpl[name] = v
        gid, order = self.gid, self.order
        ev = tmpl.take(gid) if gid is not None else tmpl.take(np.zeros(self.n, np.intp))
        ev["ts"] = self.ts
        cols = dict(self.grouped)
        if order is not None and "dirty_index" in cols and "reset_index" in cols:
            # adjacent u32 fields: one u64 scatter instead of two
            both = cols.pop("dirty_index").astype(np.uint64)
            both |= np.left_shift(cols.pop("reset_index"), np.uint64(32), dtype=np.uint64)
            ev.view(_DIRTY_RESET)["both"][order] = both
        for name, v in cols.items():
            if order is not None:
                ev[name][order] = v
            else:
                ev[name] = v
        return ev


def decode_parts(payload: bytes | bytearray | memoryview) -> BlockParts:
    """The parts of one EVENTS block payload; ValueError if it is malformed."""
    rd = _Reader(payload)
    try:
        n, ngroups, gid_width, ncols, _ = rd.unpack(_BLOCK)
        if ncols != len(DELTA_COLUMNS) or gid_width not in (0, 1, 2) or ngroups < 1:
            raise ValueError("bad block header")
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
            mode, width, _, npatch, lo = rd.unpack(_COLUMN)
            if mode == _MODE_GROUP_CONST and is_grouped:
                const[name] = rd.array(dtype, ngroups)
            elif mode == _MODE_DELTA:
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
    return BlockParts(n, table, gid, order, ts, grouped, const)


def decode_events(payload: bytes | bytearray | memoryview) -> np.ndarray:
    """Events of one EVENTS block payload; ValueError if it is malformed."""
    parts = decode_parts(payload)
    try:
        return parts.events()
    except (ValueError, TypeError, IndexError) as err:
        raise ValueError(f"malformed EVENTS block: {err}") from None
