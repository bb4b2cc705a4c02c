"""Vectorised scanner for the kernel's text output of the dirty-ring tracepoints.

Both ``tracefs`` (``trace``/``trace_pipe``) and ``perf script`` print an event as a header
(task, tid, cpu, timestamp) then the tracepoint's ``TP_printk`` text, which is the same in
both (include/trace/events/kvm.h)::

    kvm_dirty_ring_push: ring %d: dirty 0x%x reset 0x%x slot %u offset 0x%llx (used %u)
    kvm_dirty_ring_reset: ring %d: dirty 0x%x reset 0x%x (used %u)
    kvm_dirty_ring_exit: vcpu %d
    kvm_userspace_exit: reason %s (%d)

A regex per line manages about 0.7 M lines/s here before any conversion. Instead, a chunk
of text is one numpy byte array read through an unaligned 64-bit view: every field is one
8-byte load per event, classified and converted with SIMD-within-a-register arithmetic
(:mod:`.swar`). Lines that name a dirty-ring event but do not fit the shape are counted
in :attr:`Scanned.bad` and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .swar import Words

__all__ = ["Scanned", "scan", "K_PUSH", "K_RESET", "K_DREXIT", "K_UEXIT"]

K_PUSH, K_RESET, K_DREXIT, K_UEXIT = 1, 2, 3, 9
PAD = 512
BLOCK = 32768  # events per vectorised block (keeps temporaries in cache)
_POW10 = np.array([10**i for i in range(20)], dtype=np.uint64)

_NAMES = {
    K_PUSH: b"kvm_dirty_ring_push: ring ",
    K_RESET: b"kvm_dirty_ring_reset: ring ",
    K_DREXIT: b"kvm_dirty_ring_exit: vcpu ",
    K_UEXIT: b"kvm_userspace_exit: reason ",
}


@dataclass
class Scanned:
    """Events found in a chunk, in file order (ts in ns; pid 0 = tgid unknown)."""

    kind: np.ndarray
    ts: np.ndarray
    tid: np.ndarray
    pid: np.ndarray
    ring: np.ndarray
    di: np.ndarray
    ri: np.ndarray
    slot: np.ndarray
    off: np.ndarray
    bad: int  # lines naming a dirty-ring event that could not be parsed


def _header(w: Words, p: np.ndarray, perf: bool) -> tuple[np.ndarray, ...]:
    """ts (ns), tid, pid (0 unknown) and a validity mask from the text before the event
    name at ``p``. ftrace: ``comm-tid [(tgid)] [cpu] [flags] sec.frac: name``; perf
    script: ``comm [pid/]tid [[cpu]] sec.frac: kvm:name``."""
    a = w.a
    colon = w.skip_back(p - 5, "space") if perf else p - 2
    ok = a[colon] == ord(":")
    frac, nf = w.dec_back(colon - 1)
    dot = colon - 1 - nf
    ok &= (a[dot] == ord(".")) & (nf > 0) & (nf <= 9)
    sec, nsec = w.dec_back(dot - 1)
    ok &= nsec > 0
    ts = sec * np.uint64(10**9) + frac * _POW10[np.clip(9 - nf, 0, 9)]
    e = w.skip_back(dot - 1 - nsec, "space")
    if not perf:  # the irq-info flags token is optional
        flags = a[e] != ord("]")
        if flags.any():
            e = np.where(flags, w.skip_back(e - w.run_back(e, "token"), "space"), e)
    cpu = a[e] == ord("]")
    ncpu = w.run_back(e - 1, "digit")
    e = np.where(cpu, w.skip_back(e - ncpu - 2, "space"), e)
    if perf:
        tid, nt = w.dec_back(e)
        slash = a[e - nt] == ord("/")
        pid, npid = w.dec_back(e - nt - 1)
        pid = np.where(slash, pid, np.uint64(0))
        ok &= (nt > 0) & (cpu | (nt > 0))
        before = np.where(slash, e - nt - 1 - npid, e - nt)
        ok &= (a[before] == ord(" ")) | (a[before] == ord("\t"))
        return ts, tid, pid, ok
    ok &= cpu
    tg = a[e] == ord(")")
    if tg.any():
        pid, _ = w.dec_back(e - 1)
        pid = np.where(tg, pid, np.uint64(0))
        e_open = w.skip_back(e - 1 - w.run_back(e - 1, "token"), "space")
        e_tid = w.skip_back(np.where(a[e_open] == ord("("), e_open - 1, e_open), "space")
        e = np.where(tg, e_tid, e)
    else:
        pid = np.zeros(len(p), np.uint64)
    tid, nt = w.dec_back(e)
    ok &= (nt > 0) & (a[e - nt] == ord("-"))
    return ts, tid, pid, ok


def _payload(w: Words, k: np.ndarray, kind: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """Fields after the event name; clears out["ok"] where the text does not fit."""
    ok = out["ok"]
    for code in (K_PUSH, K_RESET):
        sel = np.flatnonzero(kind == code)
        if not len(sel):
            continue
        s = k[sel] + len(_NAMES[code])
        v, n = w.dec_fwd(s)
        out["ring"][sel] = v.astype(np.int64)
        s = s + n
        good = (n > 0) & w.eq(s, b": dirty 0x")
        v, n = w.hex_fwd(s + 10)
        out["di"][sel] = v
        s = s + 10 + n
        good &= (n > 0) & (n <= 8) & w.eq(s, b" reset 0x")
        v, n = w.hex_fwd(s + 9)
        out["ri"][sel] = v
        good &= (n > 0) & (n <= 8)
        if code == K_PUSH:
            s = s + 9 + n
            good &= w.eq(s, b" slot ")
            v, n = w.dec_fwd(s + 6)
            out["slot"][sel] = v
            s = s + 6 + n
            good &= (n > 0) & (n <= 10) & w.eq(s, b" offset 0x")
            v, n = w.hex_fwd(s + 10)
            out["off"][sel] = v
            good &= (n > 0) & (n <= 16)
        ok[sel] = good
    sel = np.flatnonzero(kind == K_DREXIT)
    if len(sel):
        v, n = w.dec_fwd(k[sel] + len(_NAMES[K_DREXIT]))
        out["ring"][sel] = v.astype(np.int64)
        ok[sel] = n > 0
    sel = np.flatnonzero(kind == K_UEXIT)
    if len(sel):  # keep only "reason <name> (31)", not "error (31)"/"restart (31)"
        s = k[sel] + len(_NAMES[K_UEXIT])
        e = s + w.run_fwd(s, "token", words=4)
        ok[sel] = (w.eq(e, b" (31)") & ~w.eq(s, b"error ") & ~w.eq(s, b"restart ")
                   & ((w.a[e + 5] == ord("\n")) | (w.a[e + 5] == ord("\r"))))
        out["ring"][sel] = -1


def scan(buf: bytes, perf: bool) -> Scanned:
    """Scan whole lines of ftrace (``perf=False``) or ``perf script`` text."""
    w = Words(b"\n" * PAD + buf + b"\n" * PAD)
    a = w.a
    k = w.find_byte(ord("k"))
    k = k[w.eq(k, b"kvm_")]
    if perf:
        k = k[w.eq(k - 5, b" kvm:") | w.eq(k - 5, b"\tkvm:")]
    else:
        k = k[(a[k - 2] == ord(":")) & (a[k - 1] == ord(" "))]
    kind = np.zeros(len(k), np.uint8)
    words = [w.word(k + 8 * j) for j in range(4)]
    for code, name in _NAMES.items():
        kind[w.eq_words(words, name)] = code
    k, kind = k[kind > 0], kind[kind > 0]
    n = len(k)
    out = {"ring": np.zeros(n, np.int64), "di": np.zeros(n, np.uint64),
           "ri": np.zeros(n, np.uint64), "slot": np.zeros(n, np.uint64),
           "off": np.zeros(n, np.uint64), "ok": np.ones(n, bool),
           "ts": np.zeros(n, np.uint64), "tid": np.zeros(n, np.uint64),
           "pid": np.zeros(n, np.uint64), "hok": np.ones(n, bool)}
    for b0 in range(0, n, BLOCK):
        sl = slice(b0, min(n, b0 + BLOCK))
        part = {key: v[sl] for key, v in out.items()}
        _payload(w, k[sl], kind[sl], part)
        part["ts"][:], part["tid"][:], part["pid"][:], part["hok"][:] = _header(
            w, k[sl], perf)
    ok, hok = out["ok"], out["hok"]
    bad = int(np.count_nonzero(~hok | (~ok & (kind != K_UEXIT))))
    keep = ok & hok
    return Scanned(kind[keep], out["ts"][keep], out["tid"][keep].astype(np.uint32),
                   out["pid"][keep].astype(np.uint32), out["ring"][keep],
                   out["di"][keep].astype(np.uint32), out["ri"][keep].astype(np.uint32),
                   out["slot"][keep].astype(np.uint32), out["off"][keep], bad)
