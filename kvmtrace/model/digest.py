"""Order-independent digest of a multiset of (slot, offset) dirty-ring entries.

Each entry is mixed to two 64-bit values (splitmix64 finaliser); the digest is the entry
count and the two sums modulo 2**64, hashed once with SHA-256. Sums commute, so the
digest does not depend on the order or batching in which entries were harvested, state is
three integers however many entries there are, and equal multisets give equal digests.
The scalar and numpy versions agree bit for bit.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["MultisetDigest", "entry_hashes", "entry_hashes_np", "digest_of"]

_M64 = (1 << 64) - 1
_SLOT_SALT = 0x9E3779B97F4A7C15
_H2_SALT = 0x632BE59BD9B4E019
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * _C1) & _M64
    x = ((x ^ (x >> 27)) * _C2) & _M64
    return x ^ (x >> 31)


def entry_hashes(slot: int, offset: int) -> tuple[int, int]:
    """The two 64-bit hashes of one (slot, offset)."""
    h1 = _mix(_mix(slot ^ _SLOT_SALT) ^ (offset & _M64))
    return h1, _mix((h1 + _H2_SALT) & _M64)


def _mix_np(x: np.ndarray, tmp: np.ndarray | None = None) -> np.ndarray:
    """splitmix64's finaliser, in place on a u64 array of our own (returns it); ``tmp``:
    scratch of the same shape, else allocated."""
    t = np.empty_like(x) if tmp is None else tmp
    np.right_shift(x, np.uint64(30), out=t)
    x ^= t
    x *= np.uint64(_C1)
    np.right_shift(x, np.uint64(27), out=t)
    x ^= t
    x *= np.uint64(_C2)
    np.right_shift(x, np.uint64(31), out=t)
    x ^= t
    return x


def entry_hashes_np(slots: np.ndarray, offsets: np.ndarray) -> tuple[int, int]:
    """Sums (mod 2**64) of both hashes over arrays of slots (u32) and offsets (u64)."""
    n = len(slots)
    if not n:
        return 0, 0
    with np.errstate(over="ignore"):
        s0 = int(slots[0])
        if slots.strides == (0,) or (int(slots[-1]) == s0 and (slots == s0).all()):
            # one memslot (or a broadcast view of one): mix it once
            h1 = np.bitwise_xor(offsets, np.uint64(_mix(s0 ^ _SLOT_SALT)), dtype=np.uint64)
        else:
            h1 = _mix_np(slots.astype(np.uint64) ^ np.uint64(_SLOT_SALT))
            h1 ^= offsets.astype(np.uint64, copy=False)
        tmp = np.empty_like(h1)
        _mix_np(h1, tmp)
        s1 = int(h1.sum(dtype=np.uint64))
        h1 += np.uint64(_H2_SALT)
        return s1, int(_mix_np(h1, tmp).sum(dtype=np.uint64))


def digest_of(count: int, sum1: int, sum2: int) -> str:
    """Hex digest (32 hex digits) of the multiset state."""
    text = f"{count}:{sum1 & _M64:016x}:{sum2 & _M64:016x}".encode()
    return hashlib.sha256(text).hexdigest()[:32]


class MultisetDigest:
    """Incremental digest: add entries one by one or in numpy batches, in any order."""

    def __init__(self) -> None:
        self.count = 0
        self.sum1 = 0
        self.sum2 = 0

    def add(self, slot: int, offset: int) -> None:
        h1, h2 = entry_hashes(slot, offset)
        self.count += 1
        self.sum1 = (self.sum1 + h1) & _M64
        self.sum2 = (self.sum2 + h2) & _M64

    def add_np(self, slots: np.ndarray, offsets: np.ndarray) -> None:
        s1, s2 = entry_hashes_np(slots, offsets)
        self.count += len(slots)
        self.sum1 = (self.sum1 + s1) & _M64
        self.sum2 = (self.sum2 + s2) & _M64

    def hexdigest(self) -> str:
        return digest_of(self.count, self.sum1, self.sum2)
