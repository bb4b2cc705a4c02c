"""Columnar codec of one EVENTS block of a kvmtrace recording (docs/FORMAT.md).

A block of :data:`~kvmtrace.core.events.EVENT_DTYPE` events (``struct kt_event``) is
stored column by column:

- the *group* of an event is its (pid, tid, vm, ring, kind); the block's distinct groups
  form a small table and each event stores only its group number (1 or 2 bytes, none when
  the block has one group);
- ``ts`` (ns) is delta-coded in time order;
- ``value``, ``dirty_index``, ``reset_index`` and ``slot`` are delta-coded within their
  group (events taken group by group, in time order within a group): per ring, a push's
  dirty_index is the previous one + 1 and its offset often the previous + 1. A column that
  is constant within every group is stored once per group;
- a delta column is frame-of-reference coded: ``delta - lo`` in the number of bits (0 to
  64) that is cheapest overall, the values that do not fit stored as *patches* (position,
  full delta); whole bytes are split into byte planes (all low bytes, then all second
  bytes, ...), the remaining bits into bit planes (numpy packbits);
- every byte stream (group numbers, patches, planes) is zlib-compressed if that at least
  halves it, else stored: inflating barely compressible bytes costs more time than it
  saves space, and random low bytes stored as they are cost nothing to decode.

The encoder reads a block as columns (:class:`BlockBuffer`: the writer splits each batch
into them while it is in the CPU's cache), never the 48-byte records of a whole block once
per field. Groups are numbered through a lookup table when the key fields span small ranges
(one VMM, a few vCPU threads), the widths are costed on a sample of about 8 Ki deltas (the
patches are then found exactly), and zlib runs at level 2 with a window no larger than the
stream. On a captured run of the record workload (tools/bench_recorder.py) a block costs
about 60 ns per event with its columns in cache, a quarter of it zlib deflating the second
byte plane of ``ts`` (storing it instead saves about 10 ns per event for 0.6 more bytes).
The byte layout: :mod:`.recording_format`. Decoding (:mod:`.recording_decode`)
is a fixed number of numpy passes per column, no per-event Python. Arithmetic wraps
modulo the field width, so every u32/u64 value round-trips. The ``pad`` bytes are not
stored and decode as zeros.
"""

from __future__ import annotations

import zlib

import numpy as np

from ..core.columns import DIRTY_RESET_DTYPE
from ..core.events import EVENT_DTYPE
from ..errors import UsageError
from .recording_format import (
    COLUMN_HEADER,
    DELTA_COLUMNS,
    EVENTS_HEADER,
    GROUP_DTYPE,
    GROUP_KEYS,
    MAX_BLOCK_EVENTS,
    MODE_DELTA,
    MODE_GROUP_CONST,
    STREAM_HEADER,
    STREAM_STORED,
    STREAM_ZLIB,
)

__all__ = ["GROUP_DTYPE", "DELTA_COLUMNS", "MAX_BLOCK_EVENTS", "BlockBuffer", "encode_block",
           "encode_events"]

_SIGNED = {4: np.dtype("<i4"), 8: np.dtype("<i8")}
_MAX_BIT_PLANES = 2  # 3..7 leftover bits take a byte plane: faster to decode
_MIN_RATIO = 2.0  # compress a stream only if zlib at least halves it (inflate is slow)
_SMALL_RADIX = 1 << 16  # largest product of key-field ranges numbered by lookup table
_CHOOSE_SAMPLE = 8192  # bit widths are chosen from about this many deltas


#: the columns a BlockBuffer keeps (dirty_index and reset_index as one u64, ``pair``)
_BUFFER_FIELDS = ("ts", "value", "pid", "tid", "slot", "ring", "vm", "kind")


class BlockBuffer:
    """Up to ``capacity`` (at most :data:`MAX_BLOCK_EVENTS`) events of one block, field by
    field in contiguous columns: what the encoder reads. :meth:`put` appends
    :data:`~kvmtrace.core.events.EVENT_DTYPE` records, one strided read per field of a
    batch the caller has just made (still in cache); the encoder then reads columns,
    never the 48-byte records of a whole block (several MiB, past the CPU's own cache,
    once per field). ``dirty_index`` and ``reset_index`` are kept as one u64 (``pair``,
    adjacent in struct kt_event), so that one gather orders both."""

    def __init__(self, capacity: int = MAX_BLOCK_EVENTS) -> None:
        if not 0 < capacity <= MAX_BLOCK_EVENTS:
            raise ValueError(f"a block holds 1 to {MAX_BLOCK_EVENTS} events, not {capacity}")
        self.capacity = capacity
        self._cols = {name: np.empty(capacity, EVENT_DTYPE.fields[name][0])
                      for name in _BUFFER_FIELDS}
        self._pair = np.empty(capacity, "<u8")
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def put(self, ev: np.ndarray) -> None:
        """Append ``ev`` (EVENT_DTYPE, at most the room left)."""
        a, b = self.n, self.n + len(ev)
        if b > self.capacity:
            raise ValueError(f"{len(ev)} events do not fit in {self.capacity - a}")
        for name, col in self._cols.items():
            col[a:b] = ev[name]
        self._pair[a:b] = ev.view(DIRTY_RESET_DTYPE)["both"]
        self.n = b

    def clear(self) -> None:
        self.n = 0

    @property
    def pair(self) -> np.ndarray:
        """``dirty_index | reset_index << 32`` of each event (u64)."""
        return self._pair[: self.n]

    def __getitem__(self, name: str) -> np.ndarray:
        """One field's column (a view; dirty_index and reset_index strided in ``pair``)."""
        if name in ("dirty_index", "reset_index"):
            return self.pair.view("<u4")[name == "reset_index" :: 2]
        return self._cols[name][: self.n]


def _put_stream(data: bytes, out: list[bytes], level: int) -> None:
    if level > 0 and len(data) >= 64:
        # a 4 KiB probe first: most incompressible planes are rejected cheaply
        if len(data) <= 8192 or len(zlib.compress(data[:4096], 1)) * _MIN_RATIO <= 4096 * 1.1:
            # a window no larger than the stream: same output, a cheaper deflate state
            z = zlib.compress(data, level, min(15, max(9, len(data).bit_length())))
            if len(z) * _MIN_RATIO <= len(data):
                out += [STREAM_HEADER.pack(STREAM_ZLIB, len(z), len(data)), z]
                return
    out += [STREAM_HEADER.pack(STREAM_STORED, len(data), len(data)), data]


def _dense(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, index of each element among them) of an integer array."""
    lo, hi = int(x.min()), int(x.max())
    if hi - lo < 1 << 20:
        off = (x - x.dtype.type(lo)).astype(np.intp) if lo else x.astype(np.intp)
        present = np.zeros(hi - lo + 1, bool)
        present[off] = True
        lut = np.cumsum(present, dtype=np.intp) - 1
        return np.flatnonzero(present).astype(x.dtype) + x.dtype.type(lo), lut[off]
    vals, idx = np.unique(x, return_inverse=True)
    return vals, idx.ravel()


def _groups_small(ev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`_groups` when every key field spans a small range (a live stream: one VMM, a
    few vCPU threads): one mixed-radix key per event, numbered through a lookup table.
    None when the ranges are too wide."""
    n = len(ev)
    spans: list[tuple[np.ndarray, int, int]] = []
    radix = 1
    for name in GROUP_KEYS:
        col = np.ascontiguousarray(ev[name])  # one strided pass, then contiguous ones
        lo, hi = int(col.min()), int(col.max())
        spans.append((col, lo, hi - lo + 1))
        radix *= hi - lo + 1
        if radix > _SMALL_RADIX:
            return None
    key = np.zeros(n, np.int32)
    tmp = np.empty(n, np.int32)
    for col, lo, span in spans:
        if span > 1:
            key *= span
            np.subtract(col, col.dtype.type(lo), out=tmp, casting="unsafe")
            key += tmp
    counts = np.bincount(key, minlength=radix)
    present = counts.astype(bool)
    keys = np.flatnonzero(present)
    lut = np.cumsum(present, dtype=np.int32) - 1
    table = np.zeros(len(keys), GROUP_DTYPE)
    rest = keys
    for name, (col, lo, span) in zip(reversed(GROUP_KEYS), reversed(spans), strict=True):
        table[name] = (rest % span + lo).astype(col.dtype)
        rest = rest // span
    gid_dtype = np.uint8 if len(table) <= 256 else np.uint16
    return table, lut.astype(gid_dtype).take(key), counts[keys]


def _groups(ev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group table, group number of each event, events of each group): distinct (pid,
    tid, vm, ring, kind)."""
    small = _groups_small(ev)
    if small is not None:
        return small
    n = len(ev)
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for key in GROUP_KEYS:
        col = ev[key]
        change[1:] |= col[1:] != col[:-1]
    starts = np.flatnonzero(change)
    runs = np.diff(np.append(starts, n))
    # one int64 key per run head, mixing the dense index of each field (mixed radix)
    fields = [_dense(ev[name][starts]) for name in GROUP_KEYS]
    radix = 1
    for vals, _ in fields:
        radix *= len(vals)
    if radix < 1 << 62:
        key = np.zeros(len(starts), np.int64)
        for vals, idx in fields:
            key = key * len(vals) + idx
        keys, inverse = _dense(key)
        table = np.zeros(len(keys), GROUP_DTYPE)
        rest = keys.copy()
        for name, (vals, _) in zip(reversed(GROUP_KEYS), reversed(fields), strict=True):
            table[name] = vals[rest % len(vals)]
            rest //= len(vals)
    else:  # very many distinct values: compare the rows' bytes
        heads = np.zeros(len(starts), dtype=GROUP_DTYPE)
        for name in GROUP_KEYS:
            heads[name] = ev[name][starts]
        table, inverse = np.unique(heads.view("V20"), return_inverse=True)
        table = table.view(GROUP_DTYPE)
    gid_dtype = np.uint8 if len(table) <= 256 else np.uint16
    gid = np.repeat(inverse.astype(gid_dtype).ravel(), runs)
    return table, gid, np.bincount(gid, minlength=len(table))


def _delta(v: np.ndarray) -> np.ndarray:
    d = np.empty(len(v), v.dtype)
    d[0] = v[0]
    np.subtract(v[1:], v[:-1], out=d[1:])
    return d


#: by field width in bytes, the widths a delta column may take (at most _MAX_BIT_PLANES
#: bit planes), ascending
_WIDTHS = {full: np.array([b for b in range(8 * full) if b % 8 <= _MAX_BIT_PLANES], np.int64)
           for full in (4, 8)}


def _choose(d: np.ndarray) -> tuple[int, int]:
    """(lo, bits) minimising n * bits / 8 + (4 + itemsize) bytes per patch."""
    n = len(d)
    full = d.dtype.itemsize
    signed = d.view(_SIGNED[full])
    sample = np.sort(signed[:: max(1, n // 4096)])  # lo candidates: a low quantile, the mode
    heads = np.flatnonzero(np.diff(sample, prepend=sample[:1] - 1))  # first of each value
    runs = np.diff(heads, append=len(sample))
    cands = {int(sample[len(sample) >> 9]), int(sample[heads[np.argmax(runs)]])}
    best = (0, 8 * full, n * full)
    # the widths are costed on an evenly spaced sample: the patches are found exactly later
    step = max(1, n // _CHOOSE_SAMPLE)
    part = d[::step]
    widths = _WIDTHS[full]
    for lo in sorted(cands):
        lo &= (1 << (8 * full)) - 1
        r = part - d.dtype.type(lo)
        # bit length of each residual (frexp is exact enough to choose a width), sorted:
        # the residuals longer than b bits counted by a search (bincount is slower)
        blen = np.sort(np.frexp(r.astype(np.float64))[1])
        above = (len(part) - np.searchsorted(blen, widths, "right")) * (n / len(part))
        # every allowed width at once; the first cheapest, as a loop over widths keeps it
        cost = n * widths // 8 + above.astype(np.int64) * (4 + full)
        at = int(np.argmin(cost))
        if cost[at] < best[2]:
            best = (lo, int(widths[at]), int(cost[at]))
    return best[0], best[1]


def _encode_delta(d: np.ndarray, out: list[bytes], level: int) -> None:
    """A mode-0 column from its deltas ``d`` (column order; made into the residuals in
    place)."""
    n = len(d)
    full = d.dtype.itemsize
    lo, bits = _choose(d)
    r = d
    r -= d.dtype.type(lo)
    if bits < 8 * full:
        pos = np.flatnonzero(r >= d.dtype.type(1 << bits))
    else:
        pos = np.empty(0, np.intp)
    out.append(COLUMN_HEADER.pack(MODE_DELTA, bits, 0, len(pos), lo))
    if len(pos):
        patches = r[pos] + d.dtype.type(lo)  # the full deltas (wrapping, as they were)
        _put_stream(pos.astype("<u4").tobytes() + patches.tobytes(), out, level)
        r[pos] = 0
    planes = r.view(np.uint8).reshape(n, full)
    for j in range(bits // 8):
        _put_stream(planes[:, j].tobytes(), out, level)
    if bits % 8:
        top = planes[:, bits // 8]
        for k in range(bits % 8):
            _put_stream(np.packbits((top >> k) & 1).tobytes(), out, level)


def encode_block(ev: BlockBuffer, level: int = 2) -> bytes:
    """The EVENTS block payload holding the events of ``ev``. ``level``: zlib level of
    the streams (0 = store)."""
    n = len(ev)
    table, gid, counts = _groups(ev)
    ngroups = len(table)
    gid_width = 0 if ngroups == 1 else gid.dtype.itemsize
    out: list[bytes] = [EVENTS_HEADER.pack(n, ngroups, gid_width, len(DELTA_COLUMNS), 0),
                        table.tobytes()]
    order = starts = None
    if gid_width:
        _put_stream(gid.tobytes(), out, level)
        order = np.argsort(gid, kind="stable")
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    bounds = starts if starts is not None else np.zeros(1, np.intp)
    # adjacent u32 fields: one u64 gather instead of two
    pair = (ev.pair if order is None else ev.pair.take(order)).view("<u4")
    for name, dtype, grouped in DELTA_COLUMNS:
        if name in ("dirty_index", "reset_index"):
            col = pair[name == "reset_index" :: 2]
        else:
            col = ev[name].view(dtype)
            if grouped and order is not None:
                col = col.take(order)
        d = _delta(col)
        if grouped:
            # constant within every group: its only nonzero deltas are at group starts
            nonzero = np.count_nonzero(d)
            if nonzero <= ngroups and np.count_nonzero(d[bounds]) == nonzero:
                out += [COLUMN_HEADER.pack(MODE_GROUP_CONST, 0, 0, 0, 0), col[bounds].tobytes()]
                continue
        _encode_delta(d, out, level)
    return b"".join(out)


def encode_events(ev: np.ndarray, level: int = 2) -> list[bytes]:
    """EVENTS block payloads holding ``ev``, one per :data:`MAX_BLOCK_EVENTS` events.
    ``level``: zlib level of the streams (0 = store)."""
    if ev.dtype != EVENT_DTYPE:
        raise UsageError(f"events have dtype {ev.dtype}, expected EVENT_DTYPE")
    out = []
    buf = BlockBuffer(max(1, min(len(ev), MAX_BLOCK_EVENTS)))
    for i in range(0, len(ev), MAX_BLOCK_EVENTS):
        buf.clear()
        buf.put(ev[i : i + MAX_BLOCK_EVENTS])
        out.append(encode_block(buf, level))
    return out
