"""Benchmark bundles (``kvmtrace bench -o DIR``) and the per-repetition metrics of a trace.

A bundle is a directory holding N recordings of one scenario and two JSON files:

``bundle.json`` (:data:`META_NAME`)
    ``{"schema": 1, "kind": "kvmtrace-bench", "recordings": ["rep-001.kvt", ...], ...}``:
    what ran (VMM, preset, workload flags), where (kernel release, version and command
    line, CPU model) and when (UTC), and which kvmtrace wrote it.
``metrics.json`` (:data:`METRICS_NAME`)
    ``{"schema": 1, "reps": [...]}``: one :meth:`RepMetrics.to_dict` per repetition, plus
    the VMM's own ground truth where it reports one.

:func:`load_side` resolves a compare input to a :class:`Bundle`: a bundle directory, or a
single trace file (recording, tracefs or ``perf script`` text) as a bundle of one. A
:class:`Bundle` is what ``kvmtrace compare`` hands to its views: a list of trace paths
and the bundle's metadata.

:func:`measure` profiles one trace (:func:`~kvmtrace.analysis.profile.profile_source`) and
flags its stuck or overflowed rings on the way
(:class:`~kvmtrace.analysis.stuck.EventStuck`), in one pass: :class:`RepMetrics`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.counters import OVERFLOW
from ..core.events import Kind
from ..core.sources import EventSource, SourceMeta
from ..errors import UsageError
from ..source.recording_limits import MAX_JSON_BYTES, load_json
from .distribution import percentiles
from .profile import ALL, Profile, profile_source
from .stuck import EventStuck

__all__ = [
    "BUNDLE_KIND",
    "BUNDLE_SCHEMA",
    "METRICS_SCHEMA",
    "META_NAME",
    "METRICS_NAME",
    "PAGE_BYTES",
    "Bundle",
    "RepMetrics",
    "load_side",
    "measure",
    "rep_name",
]

BUNDLE_KIND = "kvmtrace-bench"
BUNDLE_SCHEMA = 1  #: version of bundle.json
METRICS_SCHEMA = 1  #: version of metrics.json
META_NAME = "bundle.json"
METRICS_NAME = "metrics.json"
PAGE_BYTES = 4096  #: one ring entry dirties one 4 KiB guest page (x86)
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def rep_name(rep: int) -> str:
    """File name of repetition ``rep`` (1-based) in a bundle."""
    return f"rep-{rep:03d}.kvt"


@dataclass
class Bundle:
    """One side of a comparison: ``recordings`` (trace paths, in repetition order) and the
    bundle's ``bundle.json`` (``meta``; None for a single trace given as it is)."""

    path: Path
    recordings: list[Path]
    meta: dict[str, Any] | None = None

    @property
    def is_bundle(self) -> bool:
        return self.meta is not None

    @property
    def reps(self) -> int:
        return len(self.recordings)


#: the most recordings one bundle may list
MAX_RECORDINGS = 10_000
#: bundle.json fields the views read, and their types (others are kept as they are)
_META_TYPES: dict[str, str] = {"vmm": "str", "preset": "str", "cpu_model": "str",
                               "created": "str", "workload_args": "list[str]",
                               "kernel": "dict[str, str]"}


def _is(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def load_side(path: str | os.PathLike[str]) -> Bundle:
    """A bundle directory (with ``bundle.json``) or one trace file as a bundle of one.
    UsageError (one line) for a directory that is not a bundle or a bundle that lacks a
    recording it lists; a file that cannot be read is left to the trace reader."""
    p = Path(path)
    if not p.is_dir():
        return Bundle(p, [p])
    meta_path = p / META_NAME
    if not meta_path.exists():
        raise UsageError(f"{p} is a directory but not a bench bundle (no {META_NAME})",
                         "give a recording, or a directory written by kvmtrace bench")
    try:  # a regular file of bounded size (never a FIFO or a device that blocks)
        fd = os.open(meta_path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            meta = load_json(f.read(MAX_JSON_BYTES + 1))
    except (OSError, ValueError) as err:
        raise UsageError(f"{meta_path}: not a bundle's JSON ({err})",
                         "re-run kvmtrace bench") from None
    if meta.get("kind") != BUNDLE_KIND:
        raise UsageError(f"{meta_path}: not a kvmtrace bench bundle",
                         "give a directory written by kvmtrace bench")
    schema = meta.get("schema", 0)
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise UsageError(f"{meta_path}: schema is not a number", "re-run kvmtrace bench")
    if schema > BUNDLE_SCHEMA:
        raise UsageError(f"{meta_path}: bundle schema {schema} is newer than "
                         f"this kvmtrace reads ({BUNDLE_SCHEMA})", "upgrade kvmtrace")
    names = meta.get("recordings")
    if not isinstance(names, list) or not 0 < len(names) <= MAX_RECORDINGS or not all(
            isinstance(n, str) and n and "/" not in n and "\0" not in n and n not in (".", "..")
            for n in names):
        raise UsageError(f"{meta_path}: lists no recordings (1 to {MAX_RECORDINGS} file names)",
                         "re-run kvmtrace bench")
    for key, kind in _META_TYPES.items():  # what the views print: wrong types are dropped
        if key in meta and not _is(meta[key], kind):
            del meta[key]
    recs = [p / n for n in names]
    missing = [str(r) for r in recs if not r.is_file()]
    if missing:
        raise UsageError(f"bundle {p}: recording {missing[0]} is missing",
                         "re-run kvmtrace bench, or restore the file")
    return Bundle(p, recs, meta)


@dataclass
class RepMetrics:
    """The figures of one trace (one repetition) that ``compare`` judges across
    repetitions; None where the trace has nothing to measure (no stalls, no resets).

    Rates are over the trace's span (first to last event). ``rings``: distinct
    (pid, VM, ring index) that pushed, the vCPUs whose rings were used."""

    path: str
    events: int
    span_ns: int
    pushes: int
    rings: int
    soft_full_exits: int
    lost_events: int  #: events the tracer dropped
    overwritten: int  #: ring entries lost to an overflow (when the ring size is known)
    entries_per_reset: float | None
    push_rate_per_vcpu: float | None  #: pushes per second per ring that pushed
    dirty_mbps: float | None  #: pushes x 4 KiB per second, in MiB/s (QEMU's "MB/s")
    soft_full_per_1k: float | None  #: soft-full exits per 1,000 pushes
    stall_ns: dict[str, int] = field(default_factory=dict)  #: exact p50/p90/p99
    reset_lat_ns: dict[str, int] = field(default_factory=dict)  #: exact p50/p90/p99
    stall_count: int = 0
    stall_source: str | None = None
    sampled: bool = False  #: percentiles of a uniform sample (more values than kept)
    #: "pid:vm:ring" -> reason (kvmtrace.analysis.stuck: stranded, no_reset_progress,
    #: overflow)
    stuck: dict[str, str] = field(default_factory=dict)

    @property
    def anomalies(self) -> set[str]:
        """The stuck reasons of any ring, and ``overflow`` when entries were overwritten."""
        got = set(self.stuck.values())
        if self.overwritten:
            got.add(OVERFLOW)
        return got

    def value(self, key: str) -> float | None:
        """A metric by its compare key (``push_rate_per_vcpu``, ``stall_p50``, ...)."""
        for prefix, table in (("stall_", self.stall_ns), ("reset_lat_", self.reset_lat_ns)):
            if key.startswith(prefix):
                return table.get(key[len(prefix):])
        v = getattr(self, key)
        return None if v is None else float(v)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "events": self.events, "span_ns": self.span_ns,
            "pushes": self.pushes, "rings": self.rings,
            "soft_full_exits": self.soft_full_exits, "lost_events": self.lost_events,
            "overwritten": self.overwritten, "entries_per_reset": self.entries_per_reset,
            "push_rate_per_vcpu": self.push_rate_per_vcpu, "dirty_mbps": self.dirty_mbps,
            "soft_full_per_1k": self.soft_full_per_1k, "stall_ns": self.stall_ns,
            "reset_lat_ns": self.reset_lat_ns, "stall_count": self.stall_count,
            "stall_source": self.stall_source, "sampled": self.sampled,
            "stuck": self.stuck, "anomalies": sorted(self.anomalies),
        }


class _Tee(EventSource):
    """``source`` as it is, feeding every batch to the stuck-ring rules and counting the
    distinct rings that pushed."""

    def __init__(self, source: EventSource) -> None:
        self.source = source
        self.meta: SourceMeta = source.meta
        self.stuck = EventStuck()
        self.rings: set[tuple[int, int, int]] = set()

    @property
    def lost(self) -> int:
        return int(self.source.lost)

    def batches(self) -> Iterator[np.ndarray]:
        for batch in self.source.batches():
            if len(batch):
                self.stuck.feed(batch)
                push = batch[batch["kind"] == Kind.PUSH]
                if len(push):
                    keys = np.unique(push[["pid", "vm", "ring"]])
                    self.rings.update(tuple(int(x) for x in k) for k in keys.tolist())
            yield batch


def _pcts(values: np.ndarray) -> dict[str, int]:
    got = percentiles(values, [q for _, q in QUANTILES])
    return {} if got is None else {label: v for (label, _), v in zip(QUANTILES, got,
                                                                       strict=True)}


def measure(source: EventSource, path: str = "") -> tuple[Profile, RepMetrics]:
    """Profile ``source`` once; its :class:`RepMetrics` beside the profile."""
    tee = _Tee(source)
    prof = profile_source(tee)
    row = prof.rings.get(ALL)
    span = prof.span_ns
    pushes = row.pushes if row else 0
    secs = span / 1e9
    stuck = {f"{pid}:{vm}:{ring}": why for (pid, vm, ring), why in tee.stuck.stuck().items()}
    stall = row.stall_ns if row else None
    lat = row.reset_lat_ns if row else None
    return prof, RepMetrics(
        path=path, events=prof.events, span_ns=span, pushes=pushes, rings=len(tee.rings),
        soft_full_exits=row.soft_full_exits if row else 0, lost_events=prof.lost_events,
        overwritten=row.overwritten if row else 0,
        entries_per_reset=row.entries_per_reset if row else None,
        push_rate_per_vcpu=pushes / secs / len(tee.rings) if secs > 0 and tee.rings else None,
        dirty_mbps=pushes * PAGE_BYTES / 2**20 / secs if secs > 0 else None,
        soft_full_per_1k=row.soft_full_exits * 1e3 / pushes if row and pushes else None,
        stall_ns=_pcts(stall.values) if stall is not None and stall.seen else {},
        reset_lat_ns=_pcts(lat.values) if lat is not None and lat.seen else {},
        stall_count=stall.seen if stall is not None else 0,
        stall_source=prof.stall_source, sampled=prof.sampled, stuck=stuck)

