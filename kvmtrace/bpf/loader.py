"""Compile the probes (package data: kvmtrace/bpf/probes/dirty_ring.bpf.c) with bcc, attach
them, and read their maps.

Every option reaches the C side as a ``-D`` define (never by editing the C text): the pid
filter, aggregation and event output switches, ring buffer pages, the hook of each event
(raw tracepoint or tracepoint) and, for raw tracepoints, the byte offsets of the members of
``struct kvm_dirty_ring`` / ``struct kvm_vcpu`` taken from the running kernel's BTF.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import hashlib
import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import numpy as np

from ..core.counters import (
    NO_RESET_PROGRESS,
    OVERFLOW,
    STRANDED,
    STUCK_EXITS,
    RingCounters,
    RingKey,
    Snapshot,
    VmCounters,
    VmInfo,
    VmKey,
)
from ..core.events import EVENT_DTYPE
from ..core.kvm_abi import s32, u32
from ..errors import KvmtraceError, MissingFeature, UsageError
from ..host import tracefs
from ..host.bpf_syscall import BpfCmd, MapBatchAttr, ProgTestRunAttr, ProgType, bpf
from ..host.btf import Btf, load_vmlinux
from ..host.features import detect, raw_tp_attachable
from ..host.headers import use_headers
from ..host.kallsyms import addresses
from ..model.sizes import live_ring_size
from . import objcache
from .layout import (
    LOST_EVENTS,
    LOST_SLOTS,
    PUSH_SLOT_DTYPE,
    RING_KEY_DTYPE,
    RING_VAL_DTYPE,
    VM_KEY_DTYPE,
    VM_VAL_DTYPE,
)
from .percpu import RING_PAGES, PerCpuReader, ring_entries
from .rawload import load_or_compile, possible_cpus

__all__ = ["PROBES_PACKAGE", "SOURCE_NAME", "probes_dir", "MODES", "HOOKS", "VM_IDENTITIES",
           "Probes",
           "preflight", "select_hooks", "vm_ptr_defines", "merge_rows",
           "add_push_slots", "live_used_counts", "stranded_count", "slots_settled", "SnapshotRaced"]

#: the probes' C sources are package data of this package, in its folder ``probes``
PROBES_PACKAGE = __package__ or "kvmtrace.bpf"
SOURCE_NAME = "dirty_ring.bpf.c"  #: the program; kvmtrace.h and dirty_ring_defs.h beside it
#: one per use: ``top`` (aggregation), ``top-light`` (no push probe), ``record`` (events)
MODES = ("top", "top-light", "record")
_MODE_DEFINES = {"top": "-DKT_MODE_TOP", "top-light": "-DKT_MODE_TOP_LIGHT",
                 "record": "-DKT_MODE_RECORD"}
HOOKS = ("auto", "raw_tp", "tp")
#: how the probes name a VM: ``auto`` by its struct kvm * where the kernel allows
#: (:func:`vm_ptr_defines`), else ``thread``: from the ioctls seen while tracing
VM_IDENTITIES = ("auto", "thread")

# event -> (TP_PROTO argument types a raw tracepoint program expects, -D switch)
_RAW = {
    "kvm_dirty_ring_push": (("struct kvm_dirty_ring *", "u32", "u64"), "KT_RAW_PUSH"),
    "kvm_dirty_ring_reset": (("struct kvm_dirty_ring *",), "KT_RAW_RESET"),
    "kvm_dirty_ring_exit": (("struct kvm_vcpu *",), "KT_RAW_EXIT"),
    "kvm_userspace_exit": (("u32", "int"), "KT_RAW_UEXIT"),
}
_SYSCALL_EVENTS = ("sys_enter_ioctl", "sys_exit_ioctl")
_MAP_DTYPES = {"rings": (RING_KEY_DTYPE, RING_VAL_DTYPE), "vms": (VM_KEY_DTYPE, VM_VAL_DTYPE),
               "push_slots": (np.dtype("<u4"), PUSH_SLOT_DTYPE)}
_BCC_FIX = (
    "apt-get install python3-bpfcc and use a venv made with --system-site-packages "
    "(tools/setup.sh does both)"
)


@contextmanager
def probes_dir() -> Iterator[Path]:
    """The folder of the probes' C sources as a real directory for as long as the ``with``
    lasts: bcc takes the program as a file name and its headers through ``-I`` (the sources
    are package data, read through importlib.resources; from a zip they are extracted)."""
    with as_file(files(PROBES_PACKAGE).joinpath("probes")) as path:
        if not (path / SOURCE_NAME).is_file():
            raise KvmtraceError(
                f"the probes' C sources are missing: no {SOURCE_NAME} in {path}",
                "reinstall kvmtrace (pip install .): the package data was not installed",
            )
        yield path


def preflight() -> None:
    """Check what loading the probes needs; raise MissingFeature naming the exact fix."""
    if os.geteuid() != 0:
        raise MissingFeature("loading BPF probes needs root", "run kvmtrace as root (sudo)")
    root = tracefs.require_tracefs()
    for system, name in tracefs.DIRTY_RING_EVENTS:
        tracefs.event_format(system, name, root)  # raises MissingFeature naming the event
    if importlib.util.find_spec("bcc") is None:  # found, not imported: 60 MB, 0.3 s
        raise MissingFeature("bcc (BPF Compiler Collection) does not import", _BCC_FIX)
    use_headers()


def _raw_defines(btf: Btf, event: str) -> list[str] | None:
    """-D defines a raw tracepoint program of ``event`` needs, or None if BTF disagrees."""
    want, _switch = _RAW[event]
    try:
        got = tuple(t.removeprefix("__") for t, _n in btf.tracepoint_proto(event))
        ring = {m: btf.offsetof("kvm_dirty_ring", m)
                for m in ("dirty_index", "reset_index", "size", "index")}
        vcpu_ring = btf.offsetof("kvm_vcpu", "dirty_ring")
        vcpu_id = btf.offsetof("kvm_vcpu", "vcpu_id")
    except KeyError:
        return None
    if got != want:
        return None
    return [
        f"-DKT_OFF_RING_DIRTY={ring['dirty_index']}",
        f"-DKT_OFF_RING_RESET={ring['reset_index']}",
        f"-DKT_OFF_RING_SIZE={ring['size']}",
        f"-DKT_OFF_RING_INDEX={ring['index']}",
        f"-DKT_OFF_RING_SPAN={max(ring.values()) + 4}",
        f"-DKT_OFF_VCPU_RING={vcpu_ring}",
        f"-DKT_OFF_VCPU_ID={vcpu_id}",
    ]


# (struct, member) -> -D name: what naming a VM by its struct kvm * reads (KT_VM_PTR)
_VM_PTR_OFFSETS = {
    ("kvm_vcpu", "kvm"): "KT_OFF_VCPU_KVM",
    ("kvm_vcpu", "dirty_ring"): "KT_OFF_VCPU_RING",
    ("kvm_vcpu", "vcpu_id"): "KT_OFF_VCPU_ID",
    ("task_struct", "files"): "KT_OFF_TASK_FILES",
    ("files_struct", "fdt"): "KT_OFF_FILES_FDT",
    ("fdtable", "max_fds"): "KT_OFF_FDT_MAX",
    ("fdtable", "fd"): "KT_OFF_FDT_FD",
    ("file", "private_data"): "KT_OFF_FILE_PRIV",
    ("file", "f_op"): "KT_OFF_FILE_FOP",
    ("file_operations", "unlocked_ioctl"): "KT_OFF_FOP_IOCTL",
    ("kvm", "debugfs_dentry"): "KT_OFF_KVM_DENTRY",
    ("dentry", "d_name.name"): "KT_OFF_DENTRY_NAME",
}
_VM_PTR_SYMBOLS = {"kvm_vm_ioctl": "KT_VM_IOCTL", "kvm_vcpu_ioctl": "KT_VCPU_IOCTL"}


def vm_ptr_defines(btf: Btf | None, symbols: dict[str, int] | None = None) -> list[str] | None:
    """-D defines that let the probes name a VM by its ``struct kvm *`` (KT_VM_PTR), or None
    where the kernel does not allow it: no BTF describing the members read (struct
    kvm_vcpu, kvm, dentry, task_struct, files_struct, fdtable, file, file_operations), or
    ``kvm_vm_ioctl`` / ``kvm_vcpu_ioctl`` missing from /proc/kallsyms (``symbols``: for
    tests)."""
    if btf is None:
        return None
    try:
        offsets = {name: btf.offsetof(st, m) for (st, m), name in _VM_PTR_OFFSETS.items()}
    except KeyError:
        return None
    syms = addresses(set(_VM_PTR_SYMBOLS)) if symbols is None else symbols
    if set(_VM_PTR_SYMBOLS) - set(syms):
        return None
    return (["-DKT_VM_PTR=1"] + [f"-D{name}={off}" for name, off in offsets.items()]
            + [f"-D{name}={syms[sym]:#x}ULL" for sym, name in _VM_PTR_SYMBOLS.items()])


def select_hooks(hook: str = "auto", vm_identity: str = "auto"
                 ) -> tuple[dict[str, str], list[str]]:
    """Choose raw tracepoint or tracepoint per event: (hooks, cflags).

    ``auto`` takes a raw tracepoint wherever the kernel attaches one and its BTF confirms
    the TP_PROTO and the struct members; ``raw_tp`` insists (MissingFeature otherwise);
    ``tp`` uses tracepoints only. ``vm_identity`` ``auto`` adds :func:`vm_ptr_defines`
    where the kernel allows (with either hook: tracepoints then name a VM by the vCPU fd of
    the thread's KVM_RUN), ``thread`` leaves them out.
    """
    if hook not in HOOKS:
        raise UsageError(f"unknown hook {hook!r}", f"use one of {', '.join(HOOKS)}")
    if vm_identity not in VM_IDENTITIES:
        raise UsageError(f"unknown VM identity {vm_identity!r}",
                         f"use one of {', '.join(VM_IDENTITIES)}")
    hooks: dict[str, str] = {}
    cflags: list[str] = []
    btf: Btf | None = None
    if (hook != "tp" and detect().raw_tracepoint) or vm_identity == "auto":
        try:
            btf = load_vmlinux()
        except MissingFeature:
            if hook == "raw_tp":
                raise
    raw_btf = btf if hook != "tp" and detect().raw_tracepoint else None
    raw_flags: set[str] = set()
    for event, (_want, switch) in _RAW.items():
        defines = _raw_defines(raw_btf, event) if raw_btf is not None else None
        if defines is None and hook == "raw_tp":
            raise MissingFeature(
                f"no raw tracepoint for kvm:{event} on this kernel (needs BPF raw tracepoints "
                "and BTF describing it)",
                "use hook 'tp' (or 'auto')",
            )
        hooks[event] = "raw_tp" if defines else "tp"
        cflags.append(f"-D{switch}={1 if defines else 0}")
        raw_flags.update(defines or ())
    for event in _SYSCALL_EVENTS:
        hooks[event] = "syscall_tp"
    ptr = vm_ptr_defines(btf) if vm_identity == "auto" else None
    raw_flags.update(ptr or ())
    return hooks, cflags + sorted(raw_flags)


def _hooks(hook: str, vm_identity: str, cache: bool) -> tuple[dict[str, str], list[str]]:
    """:func:`select_hooks`, kept in the probe cache (its BTF parse costs 0.3 s and 45 MB)
    under what it reads: the kernel (BTF hash), whether a raw tracepoint attaches, the
    kernel symbols of :func:`vm_ptr_defines` and the code that derives the options."""
    if not objcache.enabled(not cache) or hook not in HOOKS or vm_identity not in VM_IDENTITIES:
        return select_hooks(hook, vm_identity)
    here = Path(__file__).resolve().parent
    code = [(here / "loader.py").read_bytes(), *(
        (here.parent / "host" / f"{m}.py").read_bytes() for m in ("btf", "kallsyms"))]
    syms = addresses(set(_VM_PTR_SYMBOLS))
    parts = ["select_hooks", hook, vm_identity, str(raw_tp_attachable(next(iter(_RAW)))),
             *(f"{k}={v:#x}" for k, v in sorted(syms.items())),
             *(hashlib.sha256(c).hexdigest() for c in code)]
    hooks, cflags = objcache.remember(parts, lambda: list(select_hooks(hook, vm_identity)))
    return dict(hooks), list(cflags)


def _compile(src: Path, cflags: list[str]) -> Any:
    """bcc's ``BPF`` of the probes in ``src`` under ``cflags``: compiled, loaded, attached."""
    from bcc import BPF

    try:
        return BPF(src_file=str(src / SOURCE_NAME).encode(), cflags=[f"-I{src}", *cflags])
    except Exception as err:  # bcc raises bare Exception for compile and load errors
        raise KvmtraceError(
            f"could not compile or attach {SOURCE_NAME}: {err}",
            "run tools/setup.sh (kernel headers for bcc); the compiler output is above",
        ) from None


_SUMMED = ("pushes", "resets", "entries_reset", "soft_full_exits", "stalls", "stall_ns",
           "overwritten", "stranded")
_LATEST = ("dirty_index", "reset_index", "reset_base", "reset_dirty")
_STUCK = ("stuck", "stuck_dirty", "stuck_exits", "pad")  # from the row with the latest reset


def _u32_after(x: int, y: int) -> int:
    """Sign of x - y for free-running u32 indices (wrap-aware): 1 later, -1 earlier, 0 equal."""
    d = s32(x - y)
    return (d > 0) - (d < 0)


def merge_rows(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two struct kt_ring_val (as dicts) of one ring seen under two keys, combined: counts
    add up, sizes and maxima combine, and each index is the later of the two (a ring's
    dirty_index and reset_index never go back). A row that saw neither a push nor a reset
    (soft-full exits only) carries no indices and gives none."""
    a_has, b_has = bool(a["pushes"] or a["resets"]), bool(b["pushes"] or b["resets"])
    out = {name: a[name] + b[name] for name in _SUMMED}
    for name in _LATEST:
        if a_has and b_has:
            out[name] = a[name] if _u32_after(a[name], b[name]) >= 0 else b[name]
        else:  # the row with indices, if either has them
            out[name] = (b if b_has else a)[name]
    later = b if b_has and (not a_has or _u32_after(b["reset_index"], a["reset_index"]) > 0) \
        else a
    for name in _STUCK:
        out[name] = later[name]
    out["max_used"] = max(a["max_used"], b["max_used"])
    out["size"] = a["size"] or b["size"]
    mins = [m for m in (a["exit_used_min"], b["exit_used_min"]) if m]
    out["exit_used_min"] = min(mins) if mins else 0
    out["stall_hist"] = [x + y for x, y in zip(a["stall_hist"], b["stall_hist"], strict=True)]
    out["gen"] = max(a["gen"], b["gen"])
    return out


def add_push_slots(rows: dict[RingKey, dict[str, Any]], slots: np.ndarray) -> None:
    """Fold the push fast path's slots (PUSH_SLOT_DTYPE) into the rows of their keys (the
    probes' own keys, before VM fds are resolved): pushes add up; dirty_index becomes
    dirty0 + pushes where that is later and the slot's ring is still the row's (same
    ``gen``: a later ring under the same key, after a VM fd was reused, bumps it)."""
    for s in slots:
        key = RingKey(int(s["key"]["pid"]), int(s["key"]["vm"]), int(s["key"]["ring"]))
        row, pushes = rows.get(key), int(s["pushes"])
        if row is None or not pushes:
            continue
        row["pushes"] += pushes
        dirty = u32(int(s["dirty0"]) + pushes)
        if int(s["gen"]) == row["gen"] and _u32_after(dirty, row["dirty_index"]) > 0:
            row["dirty_index"] = dirty


def live_used_counts(row: dict[str, Any], size: int | None) -> tuple[int, int]:
    """Full mode: (max_used, overwritten) of a row including the pushes since its last
    reset, which the probes count at the next reset (kt_full_reset() in
    dirty_ring_defs.h does the same sums)."""
    used = u32(row["dirty_index"] - row["reset_index"])
    over = row["overwritten"]
    if size:
        start = u32(row["reset_base"] + size)
        if _u32_after(row["reset_dirty"], start) > 0:
            start = row["reset_dirty"]
        if _u32_after(row["dirty_index"], start) > 0:
            over += u32(row["dirty_index"] - start)
    return max(row["max_used"], used), over


def stranded_count(row: dict[str, Any], size: int | None) -> tuple[int, int]:
    """(stranded, not_overwritten) of a ring (struct kt_ring_val as a dict, dirty_index up
    to date). stranded: those of ended stuck periods plus, while the ring is stuck, the
    pushes after the reset that left it stuck (kt_stuck_reset() in
    dirty_ring_defs.h), up to a lap past its reset_index. not_overwritten: of the
    pushes since that reset counted as overwritten between resets (live_used_counts()),
    those that landed on entries the stuck reset had cleared (the probes take them off at
    the next reset as well)."""
    got, back = int(row["stranded"]), 0
    if row["stuck"] and size:
        dirty, sd = row["dirty_index"], row["stuck_dirty"]
        lap = u32(row["reset_index"] + size)
        end = lap if _u32_after(dirty, lap) > 0 else dirty
        if _u32_after(end, sd) > 0:
            got += u32(end - sd)
        hit = u32(sd + size)
        if _u32_after(hit, dirty) > 0:
            hit = dirty
        if _u32_after(hit, lap) > 0:
            back = u32(hit - lap)
    return got, back


class SnapshotRaced(KvmtraceError):
    """The push slots kept changing owner while the rows were read."""


def slots_settled(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether two reads of the push slots (PUSH_SLOT_DTYPE, all slots in index order) taken
    before and after reading the rows saw no owner change or fold in between: each slot's
    ``seq`` is the same and even in both (struct kt_push_slot)."""
    seq0, seq1 = before["seq"], after["seq"]
    return len(seq0) == len(seq1) and bool(np.all(seq0 == seq1)) and not np.any(seq1 & 1)


_SNAPSHOT_TRIES = 100

class Probes:
    """The loaded, attached probes. ``snapshot()`` reads the aggregation maps once."""

    def __init__(
        self,
        mode: str = "top",
        *,
        pid: int = 0,
        hook: str = "auto",
        vm_identity: str = "auto",
        ringbuf_pages: int | None = None,
        fast_push: bool = True,
        push_slot_bits: int | None = None,
        with_events: bool = False,
        cache: bool = True,
        follow: bool = False,
    ) -> None:
        """One mode per use (:data:`MODES`; the C side gets one ``-DKT_MODE_*`` define and
        derives the rest in dirty_ring_defs.h):

        - ``top``: in-kernel aggregation per ring (:meth:`snapshot`). With a raw push hook
          each ring owns an array slot found by its kernel address (struct kt_push_slot)
          and a push is counted there, not through two hash-map lookups and a read of the
          ring (about 100 ns less per push); attribute ``fast_push`` true when in use.
        - ``top-light``: aggregation with nothing attached to kvm:kvm_dirty_ring_push, so
          the probes cost nothing per push. Each ring's pushes (dirty_index advance), used,
          max_used (used just before a reset) and overwritten entries are then updated at
          its kvm_dirty_ring_reset events only; a ring of a VM created before the probes
          counts pushes from its first reset seen. With a tracepoint exit hook, soft-full
          exits go to ring ``vcpu_id`` (the kernel makes the vCPU id the ring's index at
          KVM_CREATE_VCPU; true for the built-in VMM and QEMU).
        - ``record``: every event as a struct kt_event into the ring of the CPU it
          happens on (``ringbuf_pages`` pages per CPU, :func:`~kvmtrace.bpf.percpu.
          ring_entries`; :meth:`event_reader`, :meth:`poll_events`), no aggregation. With
          a raw push hook the same slots name a push's VM fd instead of a per-thread
          hash-map lookup.

        ``vm_identity`` (attribute ``vm_identity``: ``pointer`` or ``thread`` in use):
        ``auto`` names each VM by its ``struct kvm *`` where the kernel allows
        (:func:`vm_ptr_defines`), so a VM created before the probes has the same
        ``vm = fd | gen << 20`` on every event as one created after them; ``thread`` names
        it from the ioctls seen while tracing (pushes and exits of older VMs: vm = -1).

        For tests and benchmarks only (they compare against these; no command sets them):
        ``fast_push=False`` keeps every push on the hash-map path (the snapshots and events
        are the same either way); ``push_slot_bits``: log2 of the number of slots
        (KT_PUSH_SLOT_BITS, 10 by default; rings whose slot is taken take the hash-map
        path, so tests lower it to force collisions); ``with_events`` (``top`` only): event
        output as well, so one run's maps can be checked against its events.

        ``cache``: load the compiled probes from the probe cache when an entry for these
        sources, options and kernel is there, and fill it after compiling
        (:mod:`kvmtrace.bpf.objcache`; ``False`` or ``KVMTRACE_NO_CACHE=1``: always compile
        with bcc). Attribute ``load_how`` says which happened.

        ``follow`` (with ``pid``; ``-- COMMAND``): trace ``pid`` and every process it forks
        from now on, recursively (KT_FOLLOW: a program on sched:sched_process_fork adds each
        child before it runs), so a wrapper that forks the VMM is traced too. Attribute
        ``follow``: whether it is in effect (false on a kernel without the sched
        tracepoints; then only ``pid`` itself is traced)."""
        if mode not in MODES:
            raise UsageError(f"unknown probes mode {mode!r}", f"use one of {', '.join(MODES)}")
        if pid < 0:
            raise UsageError(f"bad pid {pid}", "give a process id, or 0 for every process")
        if ringbuf_pages is None:  # record: per CPU; with_events: one ring buffer
            ringbuf_pages = RING_PAGES if mode == "record" else 4096
        if ringbuf_pages < 1 or ringbuf_pages & (ringbuf_pages - 1):
            raise UsageError(
                f"ring buffer pages must be a power of two, not {ringbuf_pages}",
                "use e.g. 4096 (16 MiB with 4 KiB pages)",
            )
        if with_events and mode != "top":
            raise UsageError(f"with_events is for mode top, not {mode}",
                             "event output needs the push probe (top-light has none); "
                             "record emits events already")
        preflight()
        self.pid = pid
        self.mode = mode
        self.emit_events = mode == "record" or with_events
        self.aggregate = mode != "record"
        self.hooks, cflags = _hooks(hook, vm_identity, cache)
        self.vm_identity = "pointer" if "-DKT_VM_PTR=1" in cflags else "thread"
        cflags += [_MODE_DEFINES[mode], f"-DKT_PID={pid}"]
        # a kernel without the sched tracepoints: pid alone (attribute follow false)
        self.follow = bool(follow and pid and all(
            tracefs.has_event("sched", e) for e in ("sched_process_fork", "sched_process_exit")))
        if self.follow:
            cflags.append("-DKT_FOLLOW")
            if "group_dead" in tracefs.event_format("sched", "sched_process_exit"):
                cflags.append("-DKT_EXIT_GROUP_DEAD")
        if mode == "top-light":
            del self.hooks["kvm_dirty_ring_push"]
        if with_events:
            cflags.append("-DKT_TEST_EVENTS")
        if not fast_push:
            cflags.append("-DKT_NO_FAST_PUSH")
        if push_slot_bits is not None:
            if not 1 <= push_slot_bits <= 20:
                raise UsageError(f"bad push_slot_bits {push_slot_bits}", "give 1..20")
            cflags.append(f"-DKT_PUSH_SLOT_BITS={push_slot_bits}")
        self.fast_push = (fast_push and mode != "top-light" and not with_events
                          and self.hooks.get("kvm_dirty_ring_push") == "raw_tp")
        #: mode record: records per CPU ring (--ringbuf-pages per CPU), and rings
        self.cpu_ring_entries = ring_entries(ringbuf_pages) if mode == "record" else 0
        self.nr_buffers = possible_cpus() if self.cpu_ring_entries else 0
        if self.cpu_ring_entries:
            cflags += [f"-DKT_CPU_RING_ENTRIES={self.cpu_ring_entries}",
                       f"-DKT_NCPUS={self.nr_buffers}"]
        elif self.emit_events:
            cflags.append(f"-DKT_RINGBUF_PAGES={ringbuf_pages}")
        self.cflags = cflags
        t0 = time.monotonic()
        with probes_dir() as src:
            got = load_or_compile(src, cflags, lambda flags: _compile(src, flags),
                                  use_cache=cache, runtime={"KT_PID": pid})
        self._bpf: Any = got.bpf
        self.load_how = got.how  # "cache" (no bcc, no compiler) or "compiled..."
        self.load_seconds = time.monotonic() - t0
        self._rb_open = False
        self._reader: PerCpuReader | None = None
        self._free_fd: int | None = None
        self.snapshot_retries = 0  # snapshots read again because a slot changed owner

    # -- maps ---------------------------------------------------------------------------

    def read_map(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """All entries of map ``rings``, ``vms`` or ``push_slots`` as (keys, values) numpy
        arrays of RING_KEY_DTYPE/RING_VAL_DTYPE, VM_KEY_DTYPE/VM_VAL_DTYPE or u32 index/
        PUSH_SLOT_DTYPE (one batch syscall where the kernel has BPF_MAP_LOOKUP_BATCH)."""
        key_dtype, val_dtype = _MAP_DTYPES[name]
        table = self._bpf[name.encode()]
        try:
            items = list(table.items_lookup_batch())
        except Exception:  # bcc raises bare Exception on kernels without batch lookup
            items = list(table.items())
        if items and isinstance(items[0][0], int):  # an array's indices (batch lookup)
            keys = np.array([k for k, _v in items], key_dtype)
        else:
            keys = np.frombuffer(b"".join(bytes(k) for k, _v in items), key_dtype)
        vals = np.frombuffer(b"".join(bytes(v) for _k, v in items), val_dtype)
        return keys, vals

    def push_slots(self) -> np.ndarray:
        """The claimed slots of the push fast path (PUSH_SLOT_DTYPE; empty without it)."""
        if not self.fast_push:
            return np.zeros(0, PUSH_SLOT_DTYPE)
        _index, slots = self.read_map("push_slots")
        return slots[slots["ptr"] != 0]

    def lost(self) -> int:
        """Lost events: the sum over CPUs and slots of the per-CPU ``lost`` counters (events
        the ring buffer had no room for, rings/VMs/threads a full map could not track)."""
        table = self._bpf[b"lost"]
        return sum(int(x) for i in range(LOST_SLOTS) for x in table[ctypes.c_int(i)])

    def snapshot(self, resolve: Callable[[int], int] | None = None) -> Snapshot:
        """The maps now, as cumulative per-ring counters.

        ``resolve(pid)`` names the VM fd of rings the probes saw with vm = -1 (VMs created
        before tracing started; -1 = leave them); their counters merge with those of the
        resolved key (resets always know the VM fd, pushes of such VMs do not).
        Ring size: read from ``struct kvm_dirty_ring`` (raw tracepoints), else from the VM's
        KVM_ENABLE_CAP, else inferred from soft-full exits
        (:func:`~kvmtrace.model.sizes.live_ring_size`), else None. KVM_RESET_DIRTY_RINGS
        (a vm ioctl: count, total ns, latency histogram) goes to the VM's
        :class:`~kvmtrace.core.counters.VmCounters` in ``snap.vm_counters``, one per VM
        the ``vms`` map holds.
        """
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        vkeys, vvals = self.read_map("vms")
        rkeys, rvals, slots = self._rows_and_slots()
        snap = Snapshot(time_ns=now, lost_events=self.lost())
        vm_bytes: dict[tuple[int, int], int] = {}
        for k, v in zip(vkeys, vvals, strict=True):
            pid, vm = int(k["pid"]), int(k["vm"])
            vm_bytes[(pid, vm)] = int(v["ring_bytes"])
            snap.vms[(pid, vm)] = VmInfo(pid=pid, vm=vm, ring_bytes=int(v["ring_bytes"]) or None)
            snap.vm_counters[VmKey(pid, vm)] = VmCounters(
                reset_ioctls=int(v["reset_ioctls"]),
                reset_ns=int(v["reset_ns"]),
                reset_lat_hist=[int(x) for x in v["reset_lat_hist"]],
            )
        raw: dict[RingKey, dict[str, Any]] = {
            RingKey(int(k["pid"]), int(k["vm"]), int(k["ring"])):
                {name: v[name].tolist() for name in RING_VAL_DTYPE.names}
            for k, v in zip(rkeys, rvals, strict=True)}
        add_push_slots(raw, slots[slots["ptr"] != 0])
        rows: dict[RingKey, dict[str, Any]] = {}
        fds: dict[int, int] = {}
        for key, row in raw.items():
            if key.vm == -1 and resolve is not None:
                if key.pid not in fds:
                    fds[key.pid] = resolve(key.pid)
                if fds[key.pid] >= 0:
                    key = key._replace(vm=fds[key.pid])
            rows[key] = merge_rows(rows[key], row) if key in rows else row
        for key, v in rows.items():
            size = live_ring_size(v["size"], vm_bytes.get((key.pid, key.vm), 0), v["exit_used_min"])
            max_used, lost = v["max_used"], v["overwritten"]
            if self.mode != "top-light":
                max_used, lost = live_used_counts(v, size)
            stranded, back = stranded_count(v, size)
            if self.mode != "top-light":
                lost -= min(back, lost - v["overwritten"])  # counted above, not at a reset
            stuck = (STRANDED if v["stuck"] else NO_RESET_PROGRESS
                     if v["stuck_exits"] >= STUCK_EXITS else OVERFLOW if lost + stranded else None)
            snap.rings[key] = RingCounters(
                pushes=v["pushes"],
                resets=v["resets"],
                entries_reset=v["entries_reset"],
                soft_full_exits=v["soft_full_exits"],
                dirty_index=v["dirty_index"],
                reset_index=v["reset_index"],
                max_used=max_used,
                lost=lost + stranded,
                stranded=stranded,
                stuck=stuck,
                size=size,
                stall_hist=list(v["stall_hist"]),
                stall_ns=v["stall_ns"],
            )
        return snap

    def _rows_and_slots(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map ``rings`` (keys, values) and every push slot, read so that no push is missed
        or counted twice: the slots before and after the rows, again until no slot changed
        owner (and so folded its pushes into a row) in between (:func:`slots_settled`).
        The slots returned are the ones read *before* the rows: a ring's dirty_index from
        them (dirty0 + pushes) is then no later than the rows' reset_index, so used
        (dirty - reset) is never overstated. With the later read, a reset and more than
        size - used pushes between the two reads (a fraction of a millisecond at full
        rate) made a healthy ring look overflowed for one refresh. The next snapshot's
        earlier read is at least this one's later read, so counts never go back."""
        if not self.fast_push:
            rkeys, rvals = self.read_map("rings")
            return rkeys, rvals, np.zeros(0, PUSH_SLOT_DTYPE)
        for attempt in range(_SNAPSHOT_TRIES):
            before = self._all_slots()
            rkeys, rvals = self.read_map("rings")
            after = self._all_slots()
            if slots_settled(before, after):
                self.snapshot_retries += attempt
                return rkeys, rvals, before
            time.sleep(0.0005 * (attempt + 1))
        raise SnapshotRaced(f"the push slots changed owner during {_SNAPSHOT_TRIES} reads",
                            "report this: a VMM creating vCPUs without pause?")

    def _all_slots(self) -> np.ndarray:
        """Every push slot in index order: one BPF_MAP_LOOKUP_BATCH straight into a numpy
        array (bcc's batch read builds a Python object per slot: about 1 ms for 1024),
        bcc's read where the kernel has no batch lookup."""
        table = self._bpf[b"push_slots"]
        n = int(table.max_entries)
        keys = np.zeros(n, np.uint32)
        vals = np.zeros(n, PUSH_SLOT_DTYPE)
        out_batch = ctypes.c_uint32(0)
        attr = MapBatchAttr(out_batch=ctypes.addressof(out_batch), keys=keys.ctypes.data,
                            values=vals.ctypes.data, count=n, map_fd=int(table.map_fd))
        try:
            ok = bpf(BpfCmd.MAP_LOOKUP_BATCH, attr) == 0
        except OSError as err:
            ok = err.errno == errno.ENOENT  # ENOENT: the walk reached the end
        if ok and attr.count == n:
            return vals[np.argsort(keys, kind="stable")]
        index, slots = self.read_map("push_slots")
        return slots[np.argsort(index, kind="stable")]

    def forget(self, pid: int) -> None:
        """Drop the map entries of an exited process (rings, VMs, vCPU fds, VM identities:
        ``vmfds``, ``kvms``) and free its push fast-path slots (compare-and-delete: a slot
        some ring claimed since it was read keeps its new owner)."""
        names = [b"rings", b"vms", b"vcpus", b"vmfds"]
        if self.vm_identity == "pointer":
            names.append(b"kvms")
        for name in names:
            table = self._bpf[name]
            for key in [k for k in table.keys() if k.pid == pid]:
                try:
                    del table[key]
                except KeyError:
                    pass
        if self.fast_push:
            index, slots = self.read_map("push_slots")
            mine = (slots["ptr"] != 0) & (slots["key"]["pid"] == pid)
            for i, seq in zip(index[mine].tolist(), slots["seq"][mine].tolist(), strict=True):
                self.free_slot(int(i), int(seq))

    def forget_vm(self, pid: int, vm: int) -> None:
        """Drop the map entries of one VM that is gone while its process lives on (its fd
        closed, or a newer VM under the same fd): its rows, its ``vms`` entry, the vCPU fds
        that named it, and its push slots (compare-and-delete, as :meth:`forget`)."""
        for name in (b"rings", b"vms"):
            table = self._bpf[name]
            for key in [k for k in table.keys() if k.pid == pid and k.vm == vm]:
                try:
                    del table[key]
                except KeyError:
                    pass
        table = self._bpf[b"vcpus"]
        for key in [k for k, v in table.items() if k.pid == pid and v.vm == vm]:
            try:
                del table[key]
            except KeyError:
                pass
        if self.fast_push:
            index, slots = self.read_map("push_slots")
            mine = ((slots["ptr"] != 0) & (slots["key"]["pid"] == pid)
                    & (slots["key"]["vm"] == vm))
            for i, seq in zip(index[mine].tolist(), slots["seq"][mine].tolist(), strict=True):
                self.free_slot(int(i), int(seq))

    def free_slot(self, index: int, seq: int) -> bool:
        """Free push slot ``index`` if its ``seq`` is still ``seq`` (kt_free_slot in the
        probes, run once through BPF_PROG_TEST_RUN): True freed, False left alone."""
        if self._free_fd is None:
            self._free_fd = int(self._bpf.load_func(b"kt_free_slot",
                                                    ProgType.RAW_TRACEPOINT).fd)
        ctx = (ctypes.c_uint64 * 2)(index, seq)
        attr = ProgTestRunAttr(prog_fd=self._free_fd, ctx_size_in=ctypes.sizeof(ctx),
                               ctx_in=ctypes.addressof(ctx))
        try:
            bpf(BpfCmd.PROG_TEST_RUN, attr)
        except OSError as err:
            raise KvmtraceError("BPF_PROG_TEST_RUN of kt_free_slot failed: "
                                f"{os.strerror(err.errno)}",
                                "a kernel with raw tracepoint test runs (5.10+) is needed"
                                ) from None
        return attr.retval == 0

    def forget_threads(self, tids: set[int]) -> int:
        """Drop the per-thread entries (map ``tids``) of exited threads; returns how many
        were there."""
        if not tids:
            return 0
        table = self._bpf[b"tids"]
        dropped = 0
        for key in [k for k in table.keys() if k.value in tids]:
            try:
                del table[key]
                dropped += 1
            except KeyError:
                pass
        return dropped

    def map_sizes(self) -> dict[str, int]:
        """Entries in each hash map (rings, vms, vcpus, tids) and claimed push slots."""
        out = {name: len(list(self._bpf[name.encode()].keys()))
               for name in ("rings", "vms", "vcpus", "tids")}
        out["push_slots"] = len(self.push_slots())
        return out

    # -- events -------------------------------------------------------------------------

    def ringbuf_fd(self) -> int:
        """The fd of the BPF_MAP_TYPE_RINGBUF map ``events`` (event output of ``top`` with
        ``with_events``; ``record`` writes per-CPU rings: :meth:`event_reader`)."""
        if not self.emit_events or self.cpu_ring_entries:
            raise UsageError("the probes were loaded without a BPF ring buffer",
                             'construct Probes("top", with_events=True)')
        return int(self._bpf[b"events"].map_fd)

    def event_reader(self) -> PerCpuReader:
        """The reader of mode ``record``'s per-CPU event rings (maps ``cpu_heads`` and
        ``cpu_events``; :mod:`kvmtrace.bpf.percpu`). One per probes, as a ring has one
        consumer (a second would move ``tail`` under the first); closed with the probes."""
        if not self.cpu_ring_entries:
            raise UsageError("the probes were loaded without per-CPU event rings",
                             'construct Probes("record")')
        if self._reader is None:
            self._reader = PerCpuReader(int(self._bpf[b"cpu_heads"].map_fd),
                                        int(self._bpf[b"cpu_events"].map_fd),
                                        self.nr_buffers, self.cpu_ring_entries)
        return self._reader

    def lost_per_buffer(self) -> list[int]:
        """Events each CPU's ring had no room for (index = CPU; mode ``record``)."""
        return [int(x) for x in self._bpf[b"lost"][ctypes.c_int(LOST_EVENTS)]]

    def poll_events(self, timeout_ms: int = 0) -> np.ndarray:
        """Events the probes produced (tests and small traces). Mode ``record``: the
        per-CPU rings, merged (:meth:`event_reader`); ``timeout_ms`` > 0 waits that long
        first and holds back the last 2 ms (a later call returns them), 0 reads everything
        now (the producers are done). ``top`` with ``with_events``: the ring buffer,
        through bcc's per-record callback (about 1 M events/s), waiting up to timeout_ms."""
        if self.cpu_ring_entries:
            reader = self.event_reader()
            reader.wait(timeout_ms)
            return reader.read(final=not timeout_ms)
        self.ringbuf_fd()  # raises UsageError unless loaded with emit_events
        if not self._rb_open:

            def _cb(_ctx: Any, data: Any, size: int) -> None:
                self._rb_sink.append(ctypes.string_at(data, size))

            self._rb_cb = _cb  # keep the callback alive as long as the probes
            self._bpf[b"events"].open_ring_buffer(_cb)
            self._rb_open = True
        got: list[bytes] = []
        self._rb_sink = got
        if timeout_ms:
            self._bpf.ring_buffer_poll(timeout_ms)
        else:
            self._bpf.ring_buffer_consume()
        return np.frombuffer(b"".join(got), EVENT_DTYPE).copy()

    def tracepoint_formats(self) -> dict[str, str]:
        """``system:name`` -> tracefs format text of every hooked event."""
        return {f"{s}:{n}": tracefs.event_format(s, n) for s, n in tracefs.DIRTY_RING_EVENTS}

    def close(self) -> None:
        """Detach and unload, once (later calls do nothing). bcc also registers its own
        cleanup to run at exit: that one is dropped here, so a close that was cut short
        is never followed by a second detach of what is half gone. A detach bcc reports
        as failed is not raised: the kernel detaches whatever is left when the process's
        file descriptors close."""
        reader, self._reader = getattr(self, "_reader", None), None
        if reader is not None:
            reader.close()
        bpf, self._bpf = getattr(self, "_bpf", None), None
        if bpf is None:
            return
        atexit.unregister(bpf.cleanup)
        try:
            bpf.cleanup()
        except Exception:  # noqa: BLE001,S110 - bcc raises bare Exception("Failed to detach")
            pass

    def __enter__(self) -> Probes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
