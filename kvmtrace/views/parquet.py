"""Parquet export: one row per event, for DuckDB, Polars or Spark across many recordings.

Columns (one row per :data:`~kvmtrace.core.events.EVENT_DTYPE` event):

==============  ==========================  =================================================
column          type                        meaning
==============  ==========================  =================================================
ts_ns           int64                       CLOCK_MONOTONIC, ns
kind            dictionary<int16, string>   push, reset, exit, stall, reset_lat, ring_size
pid, tid        int64                       VMM tgid, thread id
vm              int32                       VM fd in the VMM (-1 unknown)
ring            int32                       kvm_dirty_ring.index = vCPU index (-1 unknown)
dirty_index     int64                       free-running u32, after the event
reset_index     int64                       free-running u32, after the event
slot            int64                       memslot, ``as_id << 16 | id`` (push); cap (ring_size)
offset          int64, null unless push     page (gfn) within the slot
value           int64, null for push        stall/reset_lat: ns; ring_size: bytes; reset: as
                                            the source gave it
vm_name         dictionary<int32, string>   the VM's name (QEMU -name guest=, libvirt domain,
                                            Firecracker --id, ...) from the meta's ``vms``;
                                            null unknown (text traces, older recordings)
==============  ==========================  =================================================

File key-value metadata: ``kvmtrace.meta`` (the source's SourceMeta as JSON, see
docs/FORMAT.md), ``kvmtrace.lost`` and ``kvmtrace.version``. Written in row groups of
``row_group_rows`` so memory stays bounded. Values of u64 fields above 2**63 wrap negative.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .. import __version__
from ..core.events import Kind
from ..core.sources import EventSource, SourceMeta
from ..errors import MissingFeature
from ..host.outfile import atomic_output
from ..source.recording import meta_to_dict

__all__ = ["KIND_NAMES", "export_parquet", "parquet_schema"]

#: kind code -> name used in the ``kind`` column (codes without a name: "kind_<n>").
KIND_NAMES: list[str] = [f"kind_{k}" for k in range(256)]
for _k in Kind:
    KIND_NAMES[_k] = _k.name.lower()


def _pa() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingFeature("pyarrow is not installed (needed for Parquet export)",
                             "pip install 'kvmtrace[export]'") from None
    return pa


def parquet_schema() -> Any:
    pa = _pa()
    return pa.schema([
        ("ts_ns", pa.int64()),
        ("kind", pa.dictionary(pa.int16(), pa.string())),
        ("pid", pa.int64()),
        ("tid", pa.int64()),
        ("vm", pa.int32()),
        ("ring", pa.int32()),
        ("dirty_index", pa.int64()),
        ("reset_index", pa.int64()),
        ("slot", pa.int64()),
        ("offset", pa.int64()),
        ("value", pa.int64()),
        ("vm_name", pa.dictionary(pa.int32(), pa.string())),
    ])


def _vm_names(ev: np.ndarray, meta: SourceMeta) -> Any:
    """The ``vm_name`` column: per event, its VM's name from ``meta.vms`` (null unknown)."""
    pa = _pa()
    names = sorted({v.name for v in meta.vms.values() if v.name})
    pairs = (ev["pid"].astype(np.int64) << 32) | (ev["vm"].astype(np.int64) & 0xFFFFFFFF)
    uniq, inv = np.unique(pairs, return_inverse=True)
    per = np.full(len(uniq), -1, np.int32)
    for i, key in enumerate(uniq.tolist()):
        vm = key & 0xFFFFFFFF
        who = meta.vm_name(key >> 32, vm - (1 << 32) if vm >= 1 << 31 else vm)
        if who is not None and who.name:
            per[i] = names.index(who.name)
    idx = per[inv.reshape(-1)]
    return pa.DictionaryArray.from_arrays(pa.array(idx, mask=idx < 0),
                                          pa.array(names, pa.string()))


def _table(ev: np.ndarray, schema: Any, meta: SourceMeta) -> Any:
    pa = _pa()
    push = ev["kind"] == Kind.PUSH
    value = ev["value"].view(np.int64)
    kind = pa.DictionaryArray.from_arrays(
        pa.array(ev["kind"].astype(np.int16)), pa.array(KIND_NAMES, pa.string())
    )
    cols = [
        pa.array(ev["ts"].view(np.int64)),
        kind,
        pa.array(ev["pid"].astype(np.int64)),
        pa.array(ev["tid"].astype(np.int64)),
        pa.array(ev["vm"]),
        pa.array(ev["ring"]),
        pa.array(ev["dirty_index"].astype(np.int64)),
        pa.array(ev["reset_index"].astype(np.int64)),
        pa.array(ev["slot"].astype(np.int64)),
        pa.array(value, mask=~push),
        pa.array(value, mask=push),
        _vm_names(ev, meta),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def export_parquet(source: EventSource, path: str | os.PathLike[str], *,
                   row_group_rows: int = 1 << 20, compression: str = "zstd",
                   jobs: int = 1) -> int:
    """Write every event of ``source`` to a Parquet file; returns the number of rows.

    ``jobs`` >= 2: the work of a row group runs on other cores while the source is read:
    ``jobs - 1`` threads build row groups' Arrow tables and one more writes them, in order
    (numpy, pyarrow's encoders and zlib give the GIL up while they work). At most ``jobs``
    row groups wait in memory. The file is byte for byte the one ``jobs=1`` writes."""
    _pa()
    import pyarrow.parquet as pq

    meta = json.dumps(meta_to_dict(source.meta), default=str, sort_keys=True)
    schema = parquet_schema().with_metadata({"kvmtrace.meta": meta,
                                             "kvmtrace.version": __version__})
    with atomic_output(path) as out:
        writer = pq.ParquetWriter(
            out.file, schema, compression=compression,
            # dictionaries for the few-valued columns, deltas for the counters: 2.5x faster
            # to write than dictionary-everything, and smaller
            use_dictionary=["kind", "pid", "tid", "vm", "ring", "slot", "vm_name"],
            column_encoding={c: "DELTA_BINARY_PACKED"
                             for c in ("ts_ns", "dirty_index", "reset_index")},
        )
        with writer:
            with _RowGroups(writer, schema, source.meta, row_group_rows, jobs) as groups:
                for batch in source.batches():
                    if len(batch):
                        groups.add(batch)
            if groups.rows == 0:
                writer.write_table(_pa().Table.from_batches([], schema=schema))
            writer.add_key_value_metadata({"kvmtrace.lost": str(int(source.lost))})
    return groups.rows


class _RowGroups:
    """Cuts events into row groups of ``rows`` and writes each (:func:`export_parquet`),
    at once (``jobs`` 1) or through builder threads and one writer thread."""

    def __init__(self, writer: Any, schema: Any, meta: SourceMeta, rows: int,
                 jobs: int) -> None:
        self.writer, self.schema, self.meta, self.size = writer, schema, meta, rows
        self.rows = 0  # handed to the writer
        self._pending: list[np.ndarray] = []
        self._npending = 0
        self._build: ThreadPoolExecutor | None = None
        self._write: ThreadPoolExecutor | None = None
        self._inflight: deque[Future[None]] = deque()
        self._jobs = max(1, jobs)
        if self._jobs >= 2:
            self._build = ThreadPoolExecutor(self._jobs - 1, "kvmtrace-parquet-build")
            self._write = ThreadPoolExecutor(1, "kvmtrace-parquet-write")

    def add(self, batch: np.ndarray) -> None:
        self._pending.append(batch)
        self._npending += len(batch)
        if self._npending >= self.size:
            self._flush(all_rows=False)

    def _flush(self, all_rows: bool) -> None:
        if not self._pending:
            return
        ev = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        cut = len(ev) if all_rows else len(ev) // self.size * self.size
        for start in range(0, cut, self.size):
            self._group(ev[start : min(start + self.size, cut)])
        self._pending = [ev[cut:]] if cut < len(ev) else []
        self._npending = len(ev) - cut

    def _group(self, part: np.ndarray) -> None:
        self.rows += len(part)
        if self._build is None or self._write is None:
            self.writer.write_table(_table(part, self.schema, self.meta),
                                    row_group_size=self.size)
            return
        table = self._build.submit(_table, part, self.schema, self.meta)
        self._inflight.append(self._write.submit(
            lambda: self.writer.write_table(table.result(), row_group_size=self.size)))
        while len(self._inflight) > self._jobs:  # bounded memory: wait for the oldest
            self._inflight.popleft().result()

    def __enter__(self) -> _RowGroups:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                self._flush(all_rows=True)
            while self._inflight:  # in order; the first failure is raised
                done = self._inflight.popleft()
                if exc_type is None:
                    done.result()
                else:  # the source failed: the file is dropped, its error goes on
                    done.exception()
        finally:
            for pool in (self._build, self._write):
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
