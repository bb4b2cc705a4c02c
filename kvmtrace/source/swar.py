"""SIMD-within-a-register helpers: read text fields with one unaligned 8-byte load each.

:class:`Words` wraps a byte buffer with an unaligned little-endian ``uint64`` view (byte
``i`` of the word at ``p`` is ``buf[p + i]``), so a field at any offset of any number of
rows is one numpy gather. Byte classes (digit, hex digit, space, token) are tested on all
8 bytes at once; a class test gives a "bad" mask with bit 7 of each byte set where the
byte is *not* in the class, and a run length is the position of the first/last bad byte.
Numbers of up to 8 digits are converted with three multiply-shift-mask steps (16 digits
with two words). All arithmetic is modulo 2**64, as numpy's uint64 is.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Words"]

U = np.uint64
_H = U(0x8080808080808080)
_L7 = U(0x7F7F7F7F7F7F7F7F)
_ONES = 0x0101010101010101


def _rep(b: int) -> np.uint64:
    return U(_ONES * b)


def _nonzero(z: np.ndarray) -> np.ndarray:
    """Bit 7 of each byte set where the byte is not zero."""
    return (((z & _L7) + _L7) | z) & _H


def _bad_digit(x: np.ndarray) -> np.ndarray:
    y = x ^ _rep(0x30)
    return (((y & _L7) + _rep(0x76)) | y) & _H


def _bad_hex(x: np.ndarray) -> np.ndarray:
    z = x ^ _rep(0x60)  # 'a'..'f' -> 1..6
    bad_af = ((((z & _L7) + _rep(0x79)) | z) & _H) | (~_nonzero(z) & _H)
    return _bad_digit(x) & bad_af


def _bad_space(x: np.ndarray) -> np.ndarray:
    return _nonzero(x ^ _rep(0x20)) & _nonzero(x ^ _rep(0x09))


def _bad_token(x: np.ndarray) -> np.ndarray:
    good = _nonzero(x ^ _rep(0x20)) & _nonzero(x ^ _rep(0x09)) & _nonzero(x ^ _rep(0x0A))
    return ~(good & _nonzero(x)) & _H


_CLASSES = {"digit": _bad_digit, "hex": _bad_hex, "space": _bad_space, "token": _bad_token}
_LOW = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=U)  # low n bytes
_TOP = np.array([((1 << (8 * n)) - 1) << (64 - 8 * n) if n else 0 for n in range(9)], U)
_SHIFT = np.array([8 * (8 - n) if n else 0 for n in range(9)], dtype=U)
_POW10 = np.array([10**i for i in range(20)], dtype=U)


def _lowest_byte(f: np.ndarray) -> np.ndarray:
    """Index of the lowest byte flagged in f (8 if none)."""
    low = f & (~f + U(1))
    bit = np.frexp(low.astype(np.float64))[1] - 1
    return np.where(f == 0, 8, (bit - 7) >> 3)


def _highest_byte(f: np.ndarray) -> np.ndarray:
    """Index of the highest byte flagged in f (-1 if none)."""
    bit = np.frexp(f.astype(np.float64))[1] - 1
    return np.where(f == 0, -1, (bit - 7) >> 3)


def _dec8(d: np.ndarray) -> np.ndarray:
    """Value of 8 digit values (0..9) with the most significant in the lowest byte."""
    v = (d * U(10) + (d >> U(8))) & U(0x00FF00FF00FF00FF)
    v = (v * U(100) + (v >> U(16))) & U(0x0000FFFF0000FFFF)
    return (v * U(10000) + (v >> U(32))) & U(0xFFFFFFFF)


def _hex8(d: np.ndarray) -> np.ndarray:
    """Value of 8 nibbles (0..15) with the most significant in the lowest byte."""
    v = ((d << U(4)) | (d >> U(8))) & U(0x00FF00FF00FF00FF)
    v = ((v << U(8)) | (v >> U(16))) & U(0x0000FFFF0000FFFF)
    return ((v << U(16)) | (v >> U(32))) & U(0xFFFFFFFF)


class Words:
    """A padded byte buffer read 8 bytes at a time at any offset."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.a = np.frombuffer(buf, dtype=np.uint8)
        self.u = np.ndarray(shape=(len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))

    def word(self, pos: np.ndarray) -> np.ndarray:
        return self.u[pos]

    def find_byte(self, ch: int) -> np.ndarray:
        """Sorted positions of byte ``ch``."""
        n = len(self.a) // 8
        aw = self.a[: n * 8].view("<u8")
        hit = np.flatnonzero(~_nonzero(aw ^ _rep(ch)) & _H)
        pos = (hit[:, None] * 8 + np.arange(8)).ravel()
        return pos[self.a[pos] == ch]

    def eq(self, pos: np.ndarray, lit: bytes) -> np.ndarray:
        """Rows whose bytes at ``pos`` spell ``lit``."""
        ok = np.ones(len(pos), bool)
        for k in range(0, len(lit), 8):
            piece = lit[k:k + 8]
            want = U(int.from_bytes(piece, "little"))
            ok &= (self.u[pos + k] & _LOW[len(piece)]) == want
        return ok

    def eq_words(self, words: list[np.ndarray], lit: bytes) -> np.ndarray:
        """Like :meth:`eq` on words already loaded (``words[j]`` at ``pos + 8 * j``)."""
        ok = np.ones(len(words[0]), bool)
        for k in range(0, len(lit), 8):
            piece = lit[k:k + 8]
            ok &= (words[k // 8] & _LOW[len(piece)]) == U(int.from_bytes(piece, "little"))
        return ok

    def run_fwd(self, pos: np.ndarray, cls: str, words: int = 2) -> np.ndarray:
        """Length of the run of class bytes starting at ``pos`` (at most 8 * words)."""
        bad = _CLASSES[cls]
        n = _lowest_byte(bad(self.u[pos]))
        more = n == 8
        for k in range(1, words):
            if not more.any():
                break
            idx = np.flatnonzero(more)
            r = _lowest_byte(bad(self.u[pos[idx] + 8 * k]))
            n[idx] += r
            more[idx] = r == 8
        return n

    def run_back(self, end: np.ndarray, cls: str, words: int = 2) -> np.ndarray:
        """Length of the run of class bytes ending at ``end`` (at most 8 * words)."""
        bad = _CLASSES[cls]
        n = 7 - _highest_byte(bad(self.u[end - 7]))
        more = n == 8
        for k in range(1, words):
            if not more.any():
                break
            idx = np.flatnonzero(more)
            r = 7 - _highest_byte(bad(self.u[end[idx] - 7 - 8 * k]))
            n[idx] += r
            more[idx] = r == 8
        return n

    def skip_back(self, e: np.ndarray, cls: str) -> np.ndarray:
        """Position before the run of class bytes ending at ``e`` (runs up to 40)."""
        return e - self.run_back(e, cls, words=5)

    def _dec_top(self, x: np.ndarray, n: np.ndarray) -> np.ndarray:
        return _dec8((x ^ _rep(0x30)) & _TOP[n])

    def dec_back(self, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(value, digits) of the decimal number ending at ``end`` (up to 16 digits)."""
        n = self.run_back(end, "digit")
        lo = self._dec_top(self.u[end - 7], np.minimum(n, 8))
        hi_n = np.clip(n - 8, 0, 8)
        if hi_n.any():
            lo = lo + self._dec_top(self.u[end - 15], hi_n) * U(10**8)
        return lo, n

    def dec_fwd(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(value, digits) of the decimal number starting at ``pos`` (up to 16 digits)."""
        n = self.run_fwd(pos, "digit")
        first = np.minimum(n, 8)
        x = ((self.u[pos] ^ _rep(0x30)) & _LOW[first]) << _SHIFT[first]
        v = _dec8(x)
        rest = np.clip(n - 8, 0, 8)
        if rest.any():
            y = ((self.u[pos + 8] ^ _rep(0x30)) & _LOW[rest]) << _SHIFT[rest]
            v = np.where(rest > 0, v * _POW10[rest] + _dec8(y), v)
        return v, n

    def hex_fwd(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(value, digits) of the lower-case hex number at ``pos`` (up to 16 digits; more
        digits give n > 16)."""
        n = self.run_fwd(pos, "hex", words=3)
        first = np.minimum(n, 8)
        x = self.u[pos]
        nib = (x & _rep(0x0F)) + U(9) * ((x >> U(6)) & _rep(0x01))
        v = _hex8((nib & _LOW[first]) << _SHIFT[first])
        rest = np.clip(n - 8, 0, 8)
        if rest.any():
            y = self.u[pos + 8]
            nib = (y & _rep(0x0F)) + U(9) * ((y >> U(6)) & _rep(0x01))
            low = _hex8((nib & _LOW[rest]) << _SHIFT[rest])
            v = np.where(rest > 0, (v << (U(4) * rest.astype(U))) | low, v)
        return v, n
