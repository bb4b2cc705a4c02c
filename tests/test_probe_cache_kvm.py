"""Probes loaded from the probe cache (kvmtrace.bpf.rawload: bpf(2) alone, no bcc) attach and
count exactly like compiled ones, against the built-in VMM's own counts; a changed ``-D``
option is compiled, not served from another option's entry; a damaged entry is compiled
over and said so; the pid filter is written into cached programs, so one entry serves
every pid. Every probe here filters on its own child's pid."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import require_bpf, require_kvm_bpf

from kvmtrace.bpf.loader import Probes
from kvmtrace.core.events import Kind
from kvmtrace.testing.held import attach, release
from kvmtrace.testing.snapshot_watch import (
    FD_BITS,
    plan,
    pushes_by_ring,
    pushes_written,
    start_cycles,
)

pytestmark = pytest.mark.kernel


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVMTRACE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KVMTRACE_NO_CACHE", raising=False)
    return tmp_path / "cache"


def _event_pushes(events: np.ndarray) -> Counter[tuple[int, int, int]]:
    got: Counter[tuple[int, int, int]] = Counter()
    pushes = events[events["kind"] == Kind.PUSH]
    for (pid, vm, ring), n in Counter(zip(pushes["pid"].tolist(), pushes["vm"].tolist(),
                                          pushes["ring"].tolist(), strict=True)).items():
        got[(pid, vm & ((1 << FD_BITS) - 1), ring)] += n
    return got


def _run(mode: str) -> tuple[str, Counter, Counter, int]:
    """One VM (2 vCPUs, 300 pages each, an exit per page) under Probes(mode) on its pid:
    (how the probes were loaded, pushes they counted per ring, the VMM's, lost events)."""
    child = start_cycles(plan(1, 2, 1))
    probes = attach(child, lambda: Probes(mode, pid=child.pid))
    try:
        truths = release(child)
        if mode == "record":
            got = _event_pushes(probes.poll_events())
        else:
            got = pushes_by_ring(probes.snapshot())
        return probes.load_how, got, pushes_written(truths), probes.lost()
    finally:
        probes.close()


@pytest.mark.parametrize("mode", ["top", "record"])
def test_a_cached_start_counts_like_a_compiled_one(mode: str, cache: Path) -> None:
    require_kvm_bpf()
    how, got, want, lost = _run(mode)
    assert how == "compiled"
    assert (got, lost) == (want, 0)
    assert len(list(cache.glob("*.json"))) == 2  # the hooks and the probes
    how, got, want, lost = _run(mode)
    assert how == "cache"
    assert (got, lost) == (want, 0)
    assert len(want) == 2 and sum(want.values()) == 600


def test_a_changed_define_is_compiled_and_a_damaged_entry_compiled_over(
        cache: Path, capfd: pytest.CaptureFixture) -> None:
    require_bpf()
    pid = os.getpid()
    with Probes("top-light", pid=pid) as p:
        assert p.load_how == "compiled"
    with Probes("top-light", pid=pid + 1) as p:  # the pid is patched in, not compiled
        assert p.load_how == "cache"
    with Probes("top-light", pid=pid, push_slot_bits=9) as p:  # a -D differs: compiled
        assert p.load_how == "compiled"
        assert "-DKT_PUSH_SLOT_BITS=9" in p.cflags
    entries = sorted(cache.glob("*.json"), key=lambda f: f.stat().st_mtime_ns)
    assert len(entries) == 3  # the hooks, and the probes of each set of options
    capfd.readouterr()

    newest = entries[-1]  # push_slot_bits=9's
    doc = json.loads(newest.read_bytes())
    doc["payload"]["progs"][0]["insns"] = "lQAAAAAAAAA="  # `exit` alone, checksum kept
    newest.write_text(json.dumps(doc))
    with Probes("top-light", pid=pid, push_slot_bits=9) as p:
        assert p.load_how == "compiled"
    assert "corrupt cache entry" in capfd.readouterr().err
    with Probes("top-light", pid=pid, push_slot_bits=9) as p:  # rewritten by that compile
        assert p.load_how == "cache"

    # intact checksum, instructions the verifier refuses (r0 never set): compiled over
    from kvmtrace.bpf import objcache

    key = newest.stem
    entry = objcache.load(key)
    progs = [objcache.ProgDef(q.name, q.prog_type, bytes.fromhex("9500000000000000"), {},
                              q.attach, q.target) if q.attach else q for q in entry.progs]
    objcache.save(objcache.CacheEntry(key, entry.license, entry.kern_version, entry.maps,
                                      progs))
    capfd.readouterr()
    with Probes("top-light", pid=pid, push_slot_bits=9) as p:
        assert p.load_how == "compiled"
        assert sorted(p._bpf.funcs) == sorted(q.name.encode() for q in progs if q.attach)
    assert "cached probes did not load" in capfd.readouterr().err
    with Probes("top-light", pid=pid, push_slot_bits=9) as p:
        assert p.load_how == "cache"


MAP_IN_MAP = Path(__file__).resolve().parent / "bpf" / "map_in_map"


def _map_in_map(cache: Path) -> tuple[str, int, int, list[int]]:
    """Load tests/bpf/map_in_map through the cache, put a new ring buffer in rbs[0], make
    getppid() calls: (how loaded, sys_enter count, sys_exit count, syscall numbers read)."""
    import ctypes

    from kvmtrace.bpf.rawload import load_or_compile
    from kvmtrace.bpf.ringbuf import RingBufReader
    from kvmtrace.host.bpf_syscall import MAP_TYPE_RINGBUF, map_create

    def compile(flags: list[str]):
        from bcc import BPF

        from kvmtrace.host.headers import use_headers

        use_headers()
        return BPF(src_file=str(MAP_IN_MAP / "map_in_map.c").encode(), cflags=flags)

    pid = os.getpid()
    got = load_or_compile(MAP_IN_MAP, [f"-DKT_PID={pid}"], compile, runtime={"KT_PID": pid})
    rb = map_create(MAP_TYPE_RINGBUF, 0, 0, 4096)
    try:
        got.bpf[b"rbs"][ctypes.c_int(0)] = ctypes.c_int(rb)
        with RingBufReader(rb, np.dtype("<u8")) as reader:
            before = [v.value for _k, v in got.bpf[b"counts"].items()]
            reader.read()
            for _ in range(100):
                os.getppid()
            after = [v.value for _k, v in got.bpf[b"counts"].items()]
            nrs = reader.read().tolist()
        return got.how, after[0] - before[0], after[1] - before[1], nrs
    finally:
        os.close(rb)
        got.bpf.cleanup()


def test_an_array_of_ring_buffers_loads_from_the_cache(cache: Path) -> None:
    require_bpf()
    sys_getppid = 110  # x86-64
    for want in ("compiled", "cache"):
        how, enters, exits, nrs = _map_in_map(cache)
        assert how == want
        assert nrs.count(sys_getppid) == 100
        # the syscalls counted between the two reads of each counter (the lookups' own
        # included) are as many entered as left, and as many as the records read
        assert enters == exits == len(nrs)
