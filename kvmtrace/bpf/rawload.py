"""Load cached probes (:mod:`kvmtrace.bpf.objcache`) with bpf(2) alone, no bcc: create the
maps, point each program's map loads at the new fds, BPF_PROG_LOAD, attach, and hand the
loader map handles shaped like bcc's tables.

:class:`RawProbes` offers the part of bcc's ``BPF`` object that kvmtrace uses: ``obj[name]``
(a :class:`RawTable`), ``funcs`` / ``load_func`` (name -> object with ``fd``),
``raw_tracepoint_fds`` / ``tracepoint_fds`` (keyed as bcc keys them), ``cleanup()`` and the
ring-buffer polling of ``poll_events``. Attaching: raw tracepoints with
BPF_RAW_TRACEPOINT_OPEN, tracepoints with a perf event (:mod:`kvmtrace.host.perf_event`).

:func:`load_or_compile` is the one entry point: the cached programs when an intact entry
for the key exists and loads, else ``compile()`` (bcc), whose result is then captured into
the cache. Whatever goes wrong with an entry, it is never half-served: everything made from
it is closed and the probes are compiled, and the reason is said on stderr.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..host.bpf_syscall import (
    BpfCmd,
    MapBatchAttr,
    bpf,
    map_create,
    map_delete,
    map_lookup,
    map_next_key,
    map_update,
    prog_load,
    raw_tracepoint_open,
)
from ..host.perf_event import attach_tracepoint
from . import objcache
from .maptypes import SCALARS, ctype_of

__all__ = ["RawFunc", "RawTable", "RawProbes", "LoadResult", "load_or_compile",
           "possible_cpus"]

# enum bpf_map_type: per-CPU values (round_up(value_size, 8) bytes per possible CPU)
_PERCPU = {5, 6, 10, 21}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE
_ARRAYS = {2, 6, 12}  # ARRAY, PERCPU_ARRAY, ARRAY_OF_MAPS: keys 0..max_entries-1


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """How many CPUs per-CPU maps hold values for (the kernel's cpu_possible_mask)."""
    n = 0
    with open(path) as f:
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            n = max(n, int(hi or lo) + 1)
    return n


@dataclass(frozen=True)
class RawFunc:
    """A loaded program (like bcc's ``BPF.Function``)."""

    name: bytes
    fd: int


class RawTable:
    """One map through bpf(2), shaped like a bcc table: ``t[key]``, ``t[key] = v``,
    ``del t[key]`` (KeyError if absent), ``keys()``, ``items()``, ``items_lookup_batch()``,
    ``map_fd``, ``max_entries``, ``Key``/``Leaf`` (ctypes types). Per-CPU maps give a list of
    one value per possible CPU."""

    def __init__(self, name: str, fd: int, mdef: objcache.MapDef, ncpus: int,
                 owner: RawProbes | None = None) -> None:
        self.name = name.encode()
        self._owner = owner
        self.map_fd = fd
        self.map_type = mdef.type
        self.max_entries = mdef.max_entries
        self.key_size, self.value_size = mdef.key_size, mdef.value_size
        self.Key = ctype_of(mdef.key_desc) if mdef.key_desc else ctypes.c_uint
        self.Leaf = ctype_of(mdef.leaf_desc) if mdef.leaf_desc else ctypes.c_uint
        self.percpu = mdef.type in _PERCPU
        self._ncpus = ncpus if self.percpu else 1
        self._stride = (mdef.value_size + 7) & ~7 if self.percpu else mdef.value_size
        self._scalar = self.Leaf in SCALARS.values()

    def _key(self, key: Any) -> bytes:
        if isinstance(key, int):
            key = self.Key(key)
        return bytes(key)[: self.key_size]

    def _leaf(self, raw: bytes, at: int = 0) -> Any:
        leaf = self.Leaf.from_buffer_copy(raw, at)
        return leaf.value if self.percpu and self._scalar else leaf

    def _value(self, raw: bytes) -> Any:
        if not self.percpu:
            return self._leaf(raw)
        return [self._leaf(raw, i * self._stride) for i in range(self._ncpus)]

    def __getitem__(self, key: Any) -> Any:
        raw = map_lookup(self.map_fd, self._key(key), self._stride * self._ncpus)
        if raw is None:
            raise KeyError(key)
        return self._value(raw)

    def __setitem__(self, key: Any, leaf: Any) -> None:
        if isinstance(leaf, int):
            leaf = self.Leaf(leaf)
        map_update(self.map_fd, self._key(key), bytes(leaf))

    def __delitem__(self, key: Any) -> None:
        if not map_delete(self.map_fd, self._key(key)):
            raise KeyError(key)

    def keys(self) -> Iterator[Any]:
        """Every key (BPF_MAP_GET_NEXT_KEY walk; arrays: every index)."""
        if self.map_type in _ARRAYS:
            yield from (self.Key(i) for i in range(self.max_entries))
            return
        key: bytes | None = None
        while (key := map_next_key(self.map_fd, key, self.key_size)) is not None:
            yield self.Key.from_buffer_copy(key)

    def __iter__(self) -> Iterator[Any]:
        return self.keys()

    def items(self) -> list[tuple[Any, Any]]:
        out = []
        for k in list(self.keys()):
            try:
                out.append((k, self[k]))
            except KeyError:  # deleted meanwhile
                continue
        return out

    def values(self) -> list[Any]:
        return [v for _k, v in self.items()]

    def open_ring_buffer(self, callback: Callable[..., Any]) -> None:
        """A ringbuf map: records go to ``callback(ctx, data, size)`` at the owner's
        ``ring_buffer_poll`` / ``ring_buffer_consume`` (as bcc's RingBuf)."""
        if self._owner is None:
            raise TypeError("a table without its RawProbes")
        self._owner._open_ring_buffer(self, callback)

    def items_lookup_batch(self) -> list[tuple[Any, Any]]:
        """Every entry in BPF_MAP_LOOKUP_BATCH calls (Linux 5.6; OSError before)."""
        n = max(1, self.max_entries)
        vsize = self._stride * self._ncpus
        keys = ctypes.create_string_buffer(n * self.key_size)
        vals = ctypes.create_string_buffer(n * vsize)
        token_in = ctypes.create_string_buffer(max(8, self.key_size))
        token_out = ctypes.create_string_buffer(max(8, self.key_size))
        out: list[tuple[Any, Any]] = []
        first = True
        while True:
            attr = MapBatchAttr(in_batch=0 if first else ctypes.addressof(token_in),
                                out_batch=ctypes.addressof(token_out),
                                keys=ctypes.addressof(keys), values=ctypes.addressof(vals),
                                count=n, map_fd=self.map_fd)
            done = False
            try:
                bpf(BpfCmd.MAP_LOOKUP_BATCH, attr)
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise
                done = True
            kraw, vraw = keys.raw, vals.raw
            for i in range(attr.count):
                key = self.Key.from_buffer_copy(kraw, i * self.key_size)
                out.append((key, self._value(vraw[i * vsize:(i + 1) * vsize])))
            if done or attr.count == 0:
                return out
            ctypes.memmove(token_in, token_out, len(token_out))
            first = False


class RawProbes:
    """Maps and programs of a cache entry, created and attached through bpf(2)."""

    def __init__(self, entry: objcache.CacheEntry, values: dict[str, int] | None = None
                 ) -> None:
        self.entry = entry
        self.values = dict(values or {})  # -D name -> value patched over its placeholder
        self.funcs: dict[bytes, RawFunc] = {}
        self.raw_tracepoint_fds: dict[bytes, int] = {}
        self.tracepoint_fds: dict[bytes, int] = {}
        self._tables: dict[bytes, RawTable] = {}
        self._fds: dict[str, int] = {}
        self._progs = {p.name.encode(): p for p in entry.progs}
        self._rb_cb: Callable[..., Any] | None = None
        self._rb_reader: Any = None
        self.module = None  # bcc's module handle: none here
        ncpus = possible_cpus()
        try:
            for m in entry.maps:
                inner = self._fds[m.inner] if m.inner is not None else 0
                fd = map_create(m.type, m.key_size, m.value_size, m.max_entries,
                                flags=m.flags, inner_map_fd=inner, name=m.name.encode())
                self._fds[m.name] = fd
                self._tables[m.name.encode()] = RawTable(m.name, fd, m, ncpus, self)
            attach = [p for p in entry.progs if p.attach is not None and p.target is not None]
            self._load_parallel(attach)
            for p in attach:
                fn = self.funcs[p.name.encode()]
                if p.attach == "raw_tp":
                    self.raw_tracepoint_fds[p.target.encode()] = raw_tracepoint_open(
                        p.target, fn.fd)
                else:
                    system, _, name = p.target.partition(":")
                    self.tracepoint_fds[p.target.encode()] = attach_tracepoint(fn.fd, system,
                                                                               name)
        except BaseException:
            self.cleanup()
            raise

    def _load_parallel(self, progs: list[objcache.ProgDef]) -> None:
        """Load ``progs`` on as many threads as there are CPUs: the kernel's verifier takes
        most of a cached start (0.1-0.2 s of CPU for each large program here), and the
        bpf(2) call runs without the GIL. The first error is raised once all are done."""
        import threading

        todo = list(progs)
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work() -> None:
            while True:
                with lock:
                    if not todo or errors:
                        return
                    p = todo.pop(0)
                try:
                    self.load_func(p.name.encode(), p.prog_type)
                except BaseException as err:  # noqa: BLE001 - re-raised below
                    with lock:
                        errors.append(err)

        threads = [threading.Thread(target=work, daemon=True)
                   for _ in range(min(len(todo), os.cpu_count() or 1) - 1)]
        for t in threads:
            t.start()
        work()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def load_func(self, name: bytes | str, prog_type: int) -> RawFunc:
        """Load program ``name`` of the entry as ``prog_type`` (once; later calls return
        the same). OSError with the verifier's first lines when the kernel refuses it."""
        name = name.encode() if isinstance(name, str) else name
        if name in self.funcs:
            return self.funcs[name]
        p = self._progs.get(name)
        if p is None:
            raise KeyError(f"no program {name.decode()} in the cached probes")
        insns = bytearray(p.insns)
        for at, map_name in p.relocs.items():
            struct.pack_into("<i", insns, 8 * at + 4, self._fds[map_name])
        for const, sites in p.consts.items():
            for at in sites:
                struct.pack_into("<i", insns, 8 * at + 4, self.values[const])
        kw: dict[str, Any] = {"license": self.entry.license.encode(),
                              "name": name[:15], "kern_version": self.entry.kern_version}
        try:
            fd = prog_load(int(prog_type), bytes(insns), **kw)
        except OSError as err:
            log = ctypes.create_string_buffer(1 << 20)
            try:
                os.close(prog_load(int(prog_type), bytes(insns), log=log, **kw))
            except OSError:
                pass
            text = log.value.decode(errors="replace").strip().splitlines()
            raise OSError(err.errno, f"loading {name.decode()}: {os.strerror(err.errno)}"
                          + (f": {text[-1]}" if text else "")) from None
        fn = RawFunc(name, fd)
        self.funcs.setdefault(name, fn)
        return self.funcs[name]

    def __getitem__(self, name: bytes | str) -> RawTable:
        key = name.encode() if isinstance(name, str) else name
        return self._tables[key]

    def __contains__(self, name: bytes | str) -> bool:
        key = name.encode() if isinstance(name, str) else name
        return key in self._tables

    # -- ring buffer, as bcc's table.open_ring_buffer / BPF.ring_buffer_poll ------------

    def _open_ring_buffer(self, table: RawTable, callback: Callable[..., Any]) -> None:
        from ..core.events import EVENT_DTYPE
        from .ringbuf import RingBufReader

        self._rb_reader = RingBufReader(table.map_fd, EVENT_DTYPE)
        self._rb_cb = callback

    def ring_buffer_poll(self, timeout: int = -1) -> None:
        """Wait up to ``timeout`` ms for records, then hand each to the callback."""
        if self._rb_reader is not None and self._rb_reader.wait(timeout):
            self.ring_buffer_consume()

    def ring_buffer_consume(self) -> None:
        """Hand every record now in the ring to the callback as ``(None, address, size)``
        (records are struct kt_event; others are skipped)."""
        if self._rb_reader is None or self._rb_cb is None:
            return
        for rec in self._rb_reader.read():
            buf = ctypes.create_string_buffer(rec.tobytes(), rec.nbytes)
            self._rb_cb(None, ctypes.addressof(buf), rec.nbytes)

    def cleanup(self) -> None:
        """Detach and close everything (idempotent)."""
        if self._rb_reader is not None:
            self._rb_reader.close()
            self._rb_reader = None
        for fds in (self.raw_tracepoint_fds, self.tracepoint_fds):
            for fd in fds.values():
                _close(fd)
            fds.clear()
        for fn in self.funcs.values():
            _close(fn.fd)
        self.funcs.clear()
        for fd in self._fds.values():
            _close(fd)
        self._fds.clear()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


@dataclass(frozen=True)
class LoadResult:
    """The probes' BPF object (bcc's ``BPF`` or a :class:`RawProbes`) and how they came:
    ``cache`` (loaded from an entry), ``compiled`` (and cached), ``compiled, not cached``
    or ``compiled, cache off``."""

    bpf: Any
    how: str
    key: str | None = None


def _placed(cflags: list[str], runtime: dict[str, int]) -> list[str]:
    """``cflags`` with ``-DNAME=value`` of each run-time option replaced by its placeholder."""
    out = []
    for flag in cflags:
        name = flag[2:].partition("=")[0] if flag.startswith("-D") else ""
        out.append(f"-D{name}={objcache.PLACEHOLDER}" if name in runtime else flag)
    return out


def load_or_compile(src: Path, cflags: list[str], compile: Callable[[list[str]], Any], *,
                    use_cache: bool = True, quiet: bool = False,
                    runtime: dict[str, int] | None = None) -> LoadResult:
    """The probes in folder ``src`` under ``cflags``: from the cache when an intact entry
    loads, else ``compile(cflags)`` (a loaded bcc ``BPF``), which is then captured into the
    cache. A cache entry that exists but cannot be served is reported on stderr (unless
    ``quiet``) and compiled over.

    ``runtime``: ``-D`` options whose value changes from run to run (the pid filter,
    ``KT_PID``), given here as name -> value. A non-zero one is compiled as
    :data:`~kvmtrace.bpf.objcache.PLACEHOLDER` (so one entry serves every pid) and the
    value is written into the instructions that hold the placeholder at load. Compiled so,
    bcc's own programs filter on no process; they are detached once captured and the
    captured ones, with the value, are loaded instead."""
    if not objcache.enabled(not use_cache):
        return LoadResult(compile(cflags), "compiled, cache off")
    values = {k: v for k, v in (runtime or {}).items() if v}
    placed = _placed(cflags, values)
    sources = sorted(p for p in src.iterdir() if p.is_file())
    key = objcache.program_key(sources, placed)
    try:
        return LoadResult(RawProbes(objcache.load(key), values), "cache", key)
    except objcache.CacheMiss as miss:
        absent = str(miss).startswith("no cache entry")
        if not absent and not quiet:
            print(f"kvmtrace: {miss}; compiling the probes", file=sys.stderr)
    except (OSError, KeyError, ValueError, TypeError) as err:
        if not quiet:
            print(f"kvmtrace: cached probes did not load ({err}); compiling the probes",
                  file=sys.stderr)
    obj = compile(placed)
    try:
        text = "\n".join(p.read_text(errors="replace") for p in sources)
        entry = objcache.capture(obj, key, text, {k: objcache.PLACEHOLDER for k in values})
    except objcache.CacheMiss as why:
        if not quiet:
            print(f"kvmtrace: the compiled probes are not cacheable ({why})", file=sys.stderr)
        if not values:
            return LoadResult(obj, "compiled, not cached", key)
        _drop(obj)
        return LoadResult(compile(cflags), "compiled, not cached", key)
    saved = objcache.save(entry)
    how = "compiled" if saved else "compiled, not cached"
    if not values:
        return LoadResult(obj, how, key)
    _drop(obj)
    try:
        return LoadResult(RawProbes(entry, values), how, key)
    except (OSError, KeyError, ValueError) as err:
        if not quiet:
            print(f"kvmtrace: the captured probes did not load ({err}); compiling them "
                  "with their options", file=sys.stderr)
        return LoadResult(compile(cflags), "compiled, not cached", key)


def _drop(obj: Any) -> None:
    """Detach and close a bcc ``BPF`` now (and not again at exit)."""
    import atexit

    atexit.unregister(obj.cleanup)
    try:
        obj.cleanup()
    except Exception:  # noqa: BLE001,S110 - bcc raises bare Exception("Failed to detach")
        pass
