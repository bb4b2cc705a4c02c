"""A cache of what compiling the probes produces, so that a start needs neither bcc nor clang.

bcc compiles ``dirty_ring.bpf.c`` (1.5-2.5 s of CPU, 170-190 MB) on every start. What it
hands the kernel is small: each map's definition and each program's instructions (``struct
bpf_insn``, 8 bytes each) in which a map is named by a 64-bit load (``BPF_LD | BPF_IMM |
BPF_DW``, opcode 0x18) of the map's fd (``src_reg`` BPF_PSEUDO_MAP_FD 1, or
BPF_PSEUDO_MAP_VALUE 2). :func:`capture` saves that, recording which map each such load
names, and :mod:`kvmtrace.bpf.rawload` loads it again through bpf(2) alone.

An entry is one JSON file, ``<key>.json``, in :func:`cache_dir` (``/var/cache/kvmtrace``,
mode 0700, announced when first made; ``KVMTRACE_CACHE_DIR`` moves it). Its name is the
SHA-256 of everything the compiled result depends on (:func:`program_key`): the probes'
C sources, every ``-D`` option, the kernel (release, build string, SHA-256 of its BTF), the
kernel headers bcc compiled against, bcc's version and kvmtrace's. Its body carries a
SHA-256 of the payload: an entry whose checksum, key or format does not match is never
served (the caller compiles and says why). Deleting the folder is always safe.

A second kind of entry, :func:`remember`, keeps the hooks and ``-D`` options that reading the
kernel's BTF gives (0.3 s and 45 MB of parsing), keyed by the BTF's SHA-256, the kernel
symbols read and the source of the code that derives them.

``KVMTRACE_NO_CACHE=1`` (or ``--no-cache``) turns both off: every start compiles.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import KvmtraceError
from ..host.bpf_syscall import map_info
from ..host.btf import VMLINUX
from ..host.headers import find_headers
from ..host.outfile import atomic_output

__all__ = ["FORMAT", "DEFAULT_DIR", "MapDef", "ProgDef", "CacheEntry", "CacheMiss",
           "enabled", "cache_dir", "kernel_identity", "program_key", "load", "save",
           "capture", "remember", "map_relocations", "const_sites", "PLACEHOLDER"]

FORMAT = 2  #: bumped whenever an entry's layout or meaning changes
DEFAULT_DIR = Path("/var/cache/kvmtrace")
#: what a run-time ``-D`` value (the pid filter) is compiled as, to be patched at load: above
#: any pid (PID_MAX_LIMIT is 2**22), below 2**31 (a BPF immediate is a signed 32-bit value)
PLACEHOLDER = 0x5EC0DE11
_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: a 16-byte instruction
_PSEUDO_MAP = (1, 2)  # BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE: imm of the first half = fd
_OF_MAPS = (12, 13)  # BPF_MAP_TYPE_ARRAY_OF_MAPS, HASH_OF_MAPS: need an inner map template


class CacheMiss(KvmtraceError):
    """No usable entry: absent, corrupt, stale or not loadable (the text says which)."""


@dataclass(frozen=True)
class MapDef:
    """One map as BPF_MAP_CREATE makes it (``enum bpf_map_type``, sizes in bytes), with
    bcc's JSON descriptions of its key and value types (for ctypes views) and, for a
    map-in-map, the name of the map its elements are shaped like."""

    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    key_desc: str
    leaf_desc: str
    inner: str | None = None


@dataclass(frozen=True)
class ProgDef:
    """One program: ``enum bpf_prog_type``, instructions, the map each map load names
    (instruction index -> map name), and where bcc attached it (``raw_tp`` with a
    tracepoint name, ``tp`` with ``system:name``, or ``None``: loaded on demand)."""

    name: str
    prog_type: int
    insns: bytes
    relocs: dict[int, str]
    attach: str | None = None
    target: str | None = None
    consts: dict[str, list[int]] = field(default_factory=dict)  # -D name -> insn indices


@dataclass
class CacheEntry:
    """What compiling produced for one key."""

    key: str
    license: str
    kern_version: int
    maps: list[MapDef]  # in creation order: an inner template before its outer map
    progs: list[ProgDef]
    facts: dict[str, Any] = field(default_factory=dict)


def enabled(no_cache: bool = False) -> bool:
    """Whether to use the cache: not with ``no_cache`` or ``KVMTRACE_NO_CACHE`` set (not
    ``0``/empty)."""
    env = os.environ.get("KVMTRACE_NO_CACHE", "")
    return not no_cache and env in ("", "0")


def cache_dir() -> Path:
    """``KVMTRACE_CACHE_DIR`` or :data:`DEFAULT_DIR`."""
    return Path(os.environ.get("KVMTRACE_CACHE_DIR") or DEFAULT_DIR)


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
    return h.hexdigest()


def _file_sha(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "absent"


_KERNEL: list[str] = []


def kernel_identity() -> str:
    """The running kernel: release, build string (``uname -v``), SHA-256 of its BTF
    (/sys/kernel/btf/vmlinux, about 9 ms) and of its build-id notes (/sys/kernel/notes)."""
    if not _KERNEL:
        u = os.uname()
        _KERNEL.append(_sha(u.release, u.version, u.machine, _file_sha(VMLINUX),
                            _file_sha(Path("/sys/kernel/notes"))))
    return _KERNEL[0]


def _bcc_version() -> str:
    """bcc's version.py text, read without importing bcc (which loads libbcc: 60 MB)."""
    try:
        spec = importlib.util.find_spec("bcc")
    except (ImportError, ValueError):
        return "absent"
    if spec is None or not spec.submodule_search_locations:
        return "absent"
    return _file_sha(Path(next(iter(spec.submodule_search_locations)), "version.py"))


def _headers() -> str:
    found = find_headers()
    if found is None:
        return "none"
    try:
        st = os.stat(found.path / "include")
    except OSError:
        return str(found.path)
    return f"{found.path.resolve()}:{st.st_ino}:{st.st_mtime_ns}"


def program_key(sources: Iterable[Path], cflags: Iterable[str]) -> str:
    """SHA-256 naming the compiled result of ``sources`` (every file of the probes) under
    ``cflags`` on this kernel, headers, bcc and kvmtrace."""
    files = sorted(sources, key=lambda p: p.name)
    return _sha(f"kvmtrace-probes/{FORMAT}", __version__, _bcc_version(), kernel_identity(),
                _headers(), *(f"{p.name}={_file_sha(p)}" for p in files), "--", *cflags)


# -- entries on disk --------------------------------------------------------------------

def _path(key: str) -> Path:
    return cache_dir() / f"{key}.json"


def _encode(entry: CacheEntry) -> dict[str, Any]:
    out = asdict(entry)
    for p in out["progs"]:
        p["insns"] = base64.b64encode(p["insns"]).decode()
        p["relocs"] = {str(k): v for k, v in p["relocs"].items()}
    return out


def _decode(payload: dict[str, Any]) -> CacheEntry:
    progs = [ProgDef(p["name"], p["prog_type"], base64.b64decode(p["insns"], validate=True),
                     {int(k): v for k, v in p["relocs"].items()}, p["attach"], p["target"],
                     {str(k): [int(i) for i in v] for k, v in p["consts"].items()})
             for p in payload["progs"]]
    return CacheEntry(payload["key"], payload["license"], payload["kern_version"],
                 [MapDef(**m) for m in payload["maps"]], progs, payload.get("facts", {}))


def _canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def load(key: str) -> CacheEntry:
    """The entry of ``key``; :class:`CacheMiss` saying why when there is none to serve
    (absent, unreadable, not JSON, wrong format, checksum or key)."""
    path = _path(key)
    try:
        with open(path, "rb") as f:
            _check_owner(path.parent, os.stat(path.parent))
            _check_owner(path, os.fstat(f.fileno()))
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise CacheMiss(f"no cache entry {path.name}") from None
    except (OSError, ValueError) as err:
        raise CacheMiss(f"unreadable cache entry {path}: {err}") from None
    try:
        payload, want = doc["payload"], doc["sha256"]
        if doc.get("format") != FORMAT:
            raise CacheMiss(f"cache entry {path} has format {doc.get('format')}, not {FORMAT}")
        if hashlib.sha256(_canonical(payload)).hexdigest() != want:
            raise CacheMiss(f"corrupt cache entry {path}: checksum mismatch")
        if payload["key"] != key:
            raise CacheMiss(f"cache entry {path} is for another key")
        return _decode(payload)
    except CacheMiss:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise CacheMiss(f"corrupt cache entry {path}: {err!r}") from None


def _check_owner(path: Path, st: os.stat_result) -> None:
    """Programs from the cache run in the kernel: only a folder and files of this user
    that no one else may write are read."""
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise CacheMiss(f"cache {path} is not this user's alone (owner {st.st_uid}, mode "
                        f"{st.st_mode & 0o777:o}); not read")


def _ensure_dir() -> Path:
    d = cache_dir()
    if not d.is_dir():
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        print(f"kvmtrace: caching compiled probes in {d} (safe to delete; KVMTRACE_NO_CACHE=1 "
              "or --no-cache compiles every time)", file=sys.stderr)
    os.chmod(d, 0o700)
    return d


def save(entry: CacheEntry) -> Path | None:
    """Write ``entry`` atomically (mode 0600, the folder 0700); a failure to write is said
    on stderr and otherwise ignored (the cache only saves time). Returns the path or None."""
    payload = _encode(entry)
    doc = {"format": FORMAT, "sha256": hashlib.sha256(_canonical(payload)).hexdigest(),
           "payload": payload}
    try:
        _ensure_dir()
        path = _path(entry.key)
        with atomic_output(path, flag="cache entry", fsync=True) as out:
            out.file.write(json.dumps(doc).encode())
    except (OSError, KvmtraceError) as err:
        print(f"kvmtrace: warning: could not write the probe cache ({err}); every start "
              "compiles", file=sys.stderr)
        return None
    return path


def remember(parts: Iterable[str], compute: Callable[[], Any]) -> Any:
    """``compute()`` (JSON-able), kept in the cache under the SHA-256 of ``parts`` and the
    kernel's identity; read back from there when present and intact."""
    key = _sha(f"kvmtrace-facts/{FORMAT}", __version__, kernel_identity(), *parts)
    try:
        return load(key).facts["value"]
    except (CacheMiss, KeyError):
        pass
    value = compute()
    save(CacheEntry(key, "", 0, [], [], {"value": value}))
    return value


# -- capture from bcc -------------------------------------------------------------------

def map_relocations(insns: bytes) -> dict[int, int]:
    """Instruction index -> map fd of every map load (BPF_LD_IMM64 with src_reg
    BPF_PSEUDO_MAP_FD or BPF_PSEUDO_MAP_VALUE) in ``insns``."""
    out: dict[int, int] = {}
    i, n = 0, len(insns) // 8
    while i < n:
        code, regs, _off, imm = struct.unpack_from("<BBhi", insns, 8 * i)
        if code == _LD_IMM64:
            if regs >> 4 in _PSEUDO_MAP:
                out[i] = imm
            i += 2
        else:
            i += 1
    return out


def _inner_names(source: str) -> dict[str, str]:
    """outer map -> inner map name, from bcc's map-in-map declarations in the C source:
    ``BPF_ARRAY_OF_MAPS(name, "inner", n)``, ``BPF_HASH_OF_MAPS(name, key, "inner", n)`` and
    ``BPF_TABLE("array_of_maps$inner", ...)`` (bcc keeps the inner name nowhere else)."""
    import re

    out: dict[str, str] = {}
    for m in re.finditer(r'BPF_ARRAY_OF_MAPS\s*\(\s*(\w+)\s*,\s*"(\w+)"', source):
        out[m.group(1)] = m.group(2)
    for m in re.finditer(r'BPF_HASH_OF_MAPS\s*\(\s*(\w+)\s*,[^,]*,\s*"(\w+)"', source):
        out[m.group(1)] = m.group(2)
    for m in re.finditer(r'BPF_TABLE\s*\(\s*"(?:array|hash)_of_maps\$(\w+)"\s*,[^,]*,[^,]*,'
                         r'\s*(\w+)', source):
        out[m.group(2)] = m.group(1)
    return out


def const_sites(insns: bytes, value: int) -> list[int]:
    """Indices of the instructions whose 32-bit immediate is ``value`` (a placeholder a
    ``-D`` option was compiled with), map loads excepted."""
    maps = map_relocations(insns)
    return [i for i in range(len(insns) // 8)
            if i not in maps and struct.unpack_from("<i", insns, 8 * i + 4)[0] == value]


def capture(bpf: Any, key: str, source: str,
            consts: dict[str, int] | None = None) -> CacheEntry:
    """An entry from a loaded bcc ``BPF`` object: every map of its module (definitions read
    back from the kernel: BPF_OBJ_GET_INFO_BY_FD), every function's instructions
    (``BPF.dump_func``) with the map of each fd load, and what bcc attached where.
    ``source``: the C text (with its headers), for map-in-map declarations. Raises
    :class:`CacheMiss` when something is not understood (then nothing is cached).
    ``consts``: ``-D`` name -> the placeholder value it was compiled with; the instructions
    holding it are recorded, to be given the real value at load (each placeholder must
    appear somewhere)."""
    import ctypes

    from bcc import libbcc

    lib, module = libbcc.lib, bpf.module
    num_tables = lib["bpf_num_tables"]  # a fresh function object: bcc declares no types
    num_tables.restype, num_tables.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    table_name = lib["bpf_table_name"]
    table_name.restype = ctypes.c_char_p
    table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    maps: list[MapDef] = []
    by_fd: dict[int, str] = {}
    inner_of = _inner_names(source)
    for i in range(num_tables(module)):
        name = table_name(module, i)
        fd = lib.bpf_table_fd(module, name)
        if fd < 0:
            raise CacheMiss(f"map {name!r} has no fd")
        info = map_info(fd)
        text = name.decode()
        if info.type in _OF_MAPS and text not in inner_of:
            raise CacheMiss(f"map-in-map {text} without a declared inner map")
        maps.append(MapDef(text, int(info.type), int(info.key_size), int(info.value_size),
                           int(info.max_entries), int(info.map_flags),
                           lib.bpf_table_key_desc(module, name).decode(),
                           lib.bpf_table_leaf_desc(module, name).decode(),
                           inner_of.get(text) if info.type in _OF_MAPS else None))
        by_fd[fd] = text
    names = {m.name for m in maps}
    for m in maps:
        if m.inner is not None and m.inner not in names:
            raise CacheMiss(f"map-in-map {m.name}: inner map {m.inner} is not in the module")
    maps.sort(key=lambda m: m.inner is not None)  # templates first
    attached = {fn: ("raw_tp", tp.decode()) for tp, fn in _raw_tp_funcs(bpf).items()}
    attached.update({fn: ("tp", tp.decode()) for tp, fn in _tp_funcs(bpf).items()})
    progs: list[ProgDef] = []
    for i in range(lib.bpf_num_functions(module)):
        fname = lib.bpf_function_name(module, i)
        insns = bytes(bpf.dump_func(fname))
        relocs: dict[int, str] = {}
        for at, fd in map_relocations(insns).items():
            if fd not in by_fd:
                raise CacheMiss(f"{fname.decode()}: instruction {at} loads fd {fd}, no map")
            relocs[at] = by_fd[fd]
        how, target = attached.get(fname, (None, None))
        ptype = {"raw_tp": 17, "tp": 5}.get(how or "", 0)
        if fname in bpf.funcs and not ptype:
            raise CacheMiss(f"{fname.decode()} is loaded but attached in no way known here")
        sites = {name: const_sites(insns, v) for name, v in (consts or {}).items()}
        progs.append(ProgDef(fname.decode(), ptype, insns, relocs, how, target,
                             {n: at for n, at in sites.items() if at}))
    for name in consts or {}:
        if not any(name in p.consts for p in progs):
            raise CacheMiss(f"-D{name} left no placeholder in the instructions")
    license = lib.bpf_module_license(module)
    return CacheEntry(key, license.decode() if license else "GPL",
                 int(lib.bpf_module_kern_version(module)), maps, progs)


def _raw_tp_funcs(bpf: Any) -> dict[bytes, bytes]:
    """raw tracepoint -> function bcc attached there (its naming rule: raw_tracepoint__TP)."""
    return {tp: b"raw_tracepoint__" + tp for tp in bpf.raw_tracepoint_fds}


def _tp_funcs(bpf: Any) -> dict[bytes, bytes]:
    """``system:name`` -> function bcc attached there (tracepoint__SYSTEM__NAME)."""
    return {tp: b"tracepoint__" + tp.replace(b":", b"__") for tp in bpf.tracepoint_fds}
