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
                   row_group_rows: int = 1 << 20, compression: str = "zstd") -> int:
    """Write every event of ``source`` to a Parquet file; returns the number of rows."""
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
        rows = _write_all(writer, source, schema, row_group_rows)
    return rows


def _write_all(writer: Any, source: EventSource, schema: Any, row_group_rows: int) -> int:
    pa = _pa()
    rows = 0
    pending: list[np.ndarray] = []
    npending = 0
    with writer:
        def flush(all_rows: bool) -> None:
            nonlocal pending, npending, rows
            if not pending:
                return
            ev = pending[0] if len(pending) == 1 else np.concatenate(pending)
            cut = len(ev) if all_rows else len(ev) // row_group_rows * row_group_rows
            for start in range(0, cut, row_group_rows):
                part = ev[start : min(start + row_group_rows, cut)]
                writer.write_table(_table(part, schema, source.meta), row_group_size=row_group_rows)
                rows += len(part)
            pending = [ev[cut:]] if cut < len(ev) else []
            npending = len(ev) - cut

        for batch in source.batches():
            if len(batch):
                pending.append(batch)
                npending += len(batch)
                if npending >= row_group_rows:
                    flush(all_rows=False)
        flush(all_rows=True)
        if rows == 0:
            writer.write_table(pa.Table.from_batches([], schema=schema))
        writer.add_key_value_metadata({"kvmtrace.lost": str(int(source.lost))})
    return rows
