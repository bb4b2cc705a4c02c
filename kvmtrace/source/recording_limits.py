"""What a recording may demand of its reader (docs/FORMAT.md, "Reading rules"): inflation
bounded by the size the format allows, JSON blocks of bounded depth and checked types.

Every check raises ``ValueError`` with a short reason; the reader
(:class:`~kvmtrace.source.recording.Recording`) turns it into a one-line format error
naming the block and its byte offset.
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any

from ..core.kvm_abi import valid_entries
from .recording_format import MAX_BLOCK_EVENTS

__all__ = [
    "inflate", "load_json", "check_meta", "check_end", "events_raw_limit",
    "MAX_JSON_BYTES", "MAX_JSON_DEPTH",
]

MAX_JSON_BYTES = 16 << 20  #: a META or END block's JSON, inflated (bytes)
MAX_JSON_DEPTH = 32  #: nesting of objects and arrays in a META or END block
_I64 = 1 << 63


def events_raw_limit(count: int) -> int:
    """The largest EVENTS payload (bytes) a block of ``count`` events can need: header,
    a group per event, 2-byte group numbers, and per column every patch, 8 byte planes,
    2 bit planes and the stream headers."""
    n = max(int(count), 1)
    return 64 + 20 * n + 2 * n + 5 * (16 + 9 * 12 + 12 * n + 8 * n + 2 * (n // 8 + 1))


def inflate(data: bytes | memoryview, raw: int) -> bytes:
    """``data`` inflated (zlib, RFC 1950) to exactly ``raw`` bytes; ValueError if it is
    not a whole stream of that length. Never inflates more than ``raw + 1`` bytes, so a
    zlib bomb costs what its declared size allows, not what it expands to."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, raw + 1)
    except zlib.error as err:
        raise ValueError(f"bad zlib data ({err})") from None
    if len(out) != raw or d.unconsumed_tail or not d.eof:
        raise ValueError(f"zlib data does not inflate to the {raw} bytes declared")
    return out


def _depth(x: Any, limit: int) -> None:
    stack = [(x, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                raise ValueError(f"JSON nested deeper than {limit}")
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))


def _no_constant(name: str) -> Any:
    raise ValueError(f"JSON has {name}")


def load_json(payload: bytes) -> dict[str, Any]:
    """A META/END payload as a JSON object: at most :data:`MAX_JSON_BYTES`, nested at most
    :data:`MAX_JSON_DEPTH`, no NaN or Infinity; ValueError otherwise."""
    if len(payload) > MAX_JSON_BYTES:
        raise ValueError(f"JSON of {len(payload)} bytes (at most {MAX_JSON_BYTES})")
    try:
        d = json.loads(payload, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH}") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"not JSON ({str(err).splitlines()[0][:80]})") from None
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    _depth(d, MAX_JSON_DEPTH)
    return d


def _int(v: Any, lo: int = -_I64, hi: int = _I64 - 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _num(v: Any) -> bool:
    return (_int(v) or isinstance(v, float) and math.isfinite(v)) and not isinstance(v, bool)


def check_meta(d: dict[str, Any]) -> None:
    """ValueError naming the first META key whose value is not shaped as written."""
    for key in ("kind", "kernel_release", "host", "writer", "format"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise ValueError(f"{key} is not a string")
    for key in ("start_time", "created"):
        if d.get(key) is not None and not _num(d[key]):
            raise ValueError(f"{key} {str(d[key])[:40]!r} is not a number of seconds")
    for key in ("hooks", "tracepoint_formats", "extra"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ValueError(f"{key} is not an object")
    for key in ("ring_entries", "vms"):
        if d.get(key) is not None and not isinstance(d[key], list):
            raise ValueError(f"{key} is not a list")
    for it in d.get("ring_entries") or []:
        if not (isinstance(it, list) and len(it) == 3 and _int(it[0]) and _int(it[1])
                and _int(it[2])):
            raise ValueError(f"ring_entries item {str(it)[:40]} is not [pid, vm, entries]")
        if not valid_entries(it[2]):
            raise ValueError(f"ring size {str(it[2])[:24]} entries is not one KVM accepts "
                             "(a power of two from 256 to 65536)")
    fv = d.get("format_version")
    if fv is not None and not (isinstance(fv, list) and all(_int(x, 0) for x in fv)):
        raise ValueError("format_version is not [major, minor]")


def check_end(d: dict[str, Any]) -> None:
    """ValueError naming the first END key whose value is not shaped as written."""
    for key in ("events", "lost", "blocks"):
        if key in d and not _int(d[key], 0):
            raise ValueError(f"{key} {str(d[key])[:40]!r} is not a non-negative integer")
    for key in ("ts_first", "ts_last"):
        if d.get(key) is not None and not _int(d[key], 0, (1 << 64) - 1):
            raise ValueError(f"{key} {str(d[key])[:40]!r} is not a timestamp in ns")
    if d.get("end_time") is not None and not _num(d["end_time"]):
        raise ValueError(f"end_time {str(d['end_time'])[:40]!r} is not a number of seconds")


assert events_raw_limit(MAX_BLOCK_EVENTS) < 1 << 28
