"""The probe cache's pure parts (kvmtrace.bpf.objcache, kvmtrace.bpf.maptypes): which
instructions name a map, what an entry's key depends on, and that an entry that is not
intact is never served. No kernel needed."""

from __future__ import annotations

import ctypes
import json
import struct
from pathlib import Path

import pytest

from kvmtrace.bpf import objcache
from kvmtrace.bpf.maptypes import ctype_of


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def test_map_loads_are_the_ld_imm64_with_a_map_fd() -> None:
    insns = b"".join([
        _insn(0xB7, 0, 0, 0, 7),          # r0 = 7
        _insn(0x18, 1, 1, 0, 42), _insn(0, 0, 0, 0, 0),   # r1 = map fd 42
        _insn(0x18, 2, 0, 0, 5), _insn(0, 0, 0, 0, 1),    # r2 = 64-bit constant, no map
        _insn(0x18, 3, 2, 0, 43), _insn(0, 0, 0, 0, 16),  # r3 = &value of map fd 43, +16
        _insn(0x95),                      # exit
    ])
    assert objcache.map_relocations(insns) == {1: 42, 5: 43}


def test_ctypes_from_bccs_descriptions() -> None:
    desc = json.dumps(["kt_key", [["pid", "unsigned int"], ["vm", "int"],
                                  ["hist", "unsigned long long", [4]],
                                  ["", [["a", "unsigned short"], ["b", "unsigned short"]],
                                   "union"]], "struct"])
    t = ctype_of(desc)
    k = t(pid=5, vm=-1)
    k.hist[3] = 9
    k.a = 3
    assert ctypes.sizeof(t) == 4 + 4 + 32 + 2 + 6  # padded to 8
    assert (k.pid, k.vm, list(k.hist), k.b) == (5, -1, [0, 0, 0, 9], 3)
    assert ctype_of('"unsigned int"') is ctypes.c_uint
    assert ctype_of("unsigned long long") is ctypes.c_ulonglong


def test_the_key_changes_with_every_define_and_source_byte(tmp_path: Path) -> None:
    src = tmp_path / "p.bpf.c"
    src.write_text("int x;\n")
    a = objcache.program_key([src], ["-DKT_PID=1", "-DKT_MODE_TOP"])
    assert a == objcache.program_key([src], ["-DKT_PID=1", "-DKT_MODE_TOP"])
    assert a != objcache.program_key([src], ["-DKT_PID=2", "-DKT_MODE_TOP"])
    assert a != objcache.program_key([src], ["-DKT_PID=1"])
    src.write_text("int y;\n")
    assert a != objcache.program_key([src], ["-DKT_PID=1", "-DKT_MODE_TOP"])


def _entry(key: str) -> objcache.CacheEntry:
    m = objcache.MapDef("rings", 1, 16, 64, 1024, 0, '"unsigned int"', '"unsigned int"')
    p = objcache.ProgDef("raw_tracepoint__x", 17, _insn(0xB7) + _insn(0x95), {}, "raw_tp", "x")
    return objcache.CacheEntry(key, "GPL", 0, [m], [p])


def test_an_entry_reads_back_and_a_damaged_one_is_never_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KVMTRACE_CACHE_DIR", str(tmp_path / "cache"))
    key = "ab" * 32
    path = objcache.save(_entry(key))
    assert path is not None and path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    assert "caching compiled probes in" in capsys.readouterr().err  # announced once
    assert objcache.load(key) == _entry(key)
    objcache.save(_entry(key))
    assert capsys.readouterr().err == ""

    good = path.read_bytes()
    doc = json.loads(good)
    doc["payload"]["progs"][0]["insns"] = "AAAAAAAAAAA="  # changed, checksum kept
    path.write_text(json.dumps(doc))
    with pytest.raises(objcache.CacheMiss, match="checksum"):
        objcache.load(key)
    path.write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(objcache.CacheMiss, match="unreadable"):
        objcache.load(key)
    doc = json.loads(good)
    doc["format"] = objcache.FORMAT + 1
    path.write_text(json.dumps(doc))
    with pytest.raises(objcache.CacheMiss, match="format"):
        objcache.load(key)
    path.write_bytes(good)
    other = "cd" * 32
    (tmp_path / "cache" / f"{other}.json").write_bytes(good)  # renamed: another key's body
    with pytest.raises(objcache.CacheMiss, match="another key"):
        objcache.load(other)
    with pytest.raises(objcache.CacheMiss, match="no cache entry"):
        objcache.load("ef" * 32)


def test_no_cache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMTRACE_NO_CACHE", raising=False)
    assert objcache.enabled() and not objcache.enabled(no_cache=True)
    monkeypatch.setenv("KVMTRACE_NO_CACHE", "1")
    assert not objcache.enabled()
    monkeypatch.setenv("KVMTRACE_NO_CACHE", "0")
    assert objcache.enabled()


def test_placeholder_sites_are_the_immediates_holding_it() -> None:
    p = objcache.PLACEHOLDER
    insns = b"".join([
        _insn(0x55, 1, 0, 2, p),              # if r1 != P goto +2
        _insn(0x18, 1, 1, 0, p), _insn(0),    # a map load whose fd happens to equal P
        _insn(0xB4, 2, 0, 0, p),              # w2 = P
        _insn(0xB7, 0, 0, 0, p + 1),
        _insn(0x95),
    ])
    assert objcache.const_sites(insns, p) == [0, 3]


def test_an_entry_others_may_write_is_not_read(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMTRACE_CACHE_DIR", str(tmp_path / "cache"))
    key = "ab" * 32
    path = objcache.save(_entry(key))
    assert path is not None
    path.chmod(0o666)
    with pytest.raises(objcache.CacheMiss, match="not this user's alone"):
        objcache.load(key)
    path.chmod(0o600)
    path.parent.chmod(0o777)
    with pytest.raises(objcache.CacheMiss, match="not this user's alone"):
        objcache.load(key)
    path.parent.chmod(0o700)
    assert objcache.load(key) == _entry(key)
