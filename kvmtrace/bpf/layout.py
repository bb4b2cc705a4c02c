"""numpy twins of the map structs in probes/kvmtrace.h beside this module (tests/test_layout.py
checks them).

Map keys and values are decoded from their raw bytes with these dtypes, so a change on the
C side that is not mirrored here fails the layout test instead of silently misreading.
"""

from __future__ import annotations

import numpy as np

from ..core.counters import HIST_BUCKETS

__all__ = ["CPU_HEAD_DTYPE", "LOST_EVENTS", "LOST_SLOTS", "PUSH_SLOT_DTYPE", "RING_KEY_DTYPE",
           "RING_VAL_DTYPE", "VM_KEY_DTYPE", "VM_VAL_DTYPE"]

LOST_SLOTS = 2  # KT_LOST_EVENTS, KT_LOST_MAPS
LOST_EVENTS = 0  # KT_LOST_EVENTS: the slot of events the output had no room for

#: struct kt_cpu_head (128 bytes): one CPU's event ring in mode record (map cpu_heads)
CPU_HEAD_DTYPE = np.dtype({"names": ["head", "busy", "tail"], "formats": ["<u8"] * 3,
                           "offsets": [0, 8, 64], "itemsize": 128})

#: struct kt_ring_key (12 bytes)
RING_KEY_DTYPE = np.dtype([("pid", "<u4"), ("vm", "<i4"), ("ring", "<i4")])

#: struct kt_ring_val; times in ns, indices are free-running u32, size in entries.
RING_VAL_DTYPE = np.dtype(
    [
        ("pushes", "<u8"),
        ("resets", "<u8"),
        ("entries_reset", "<u8"),
        ("soft_full_exits", "<u8"),
        ("stalls", "<u8"),
        ("stall_ns", "<u8"),
        ("overwritten", "<u8"),
        ("dirty_index", "<u4"),
        ("reset_index", "<u4"),
        ("reset_base", "<u4"),
        ("max_used", "<u4"),
        ("size", "<u4"),
        ("exit_used_min", "<u4"),
        ("reset_dirty", "<u4"),
        ("gen", "<u4"),
        ("stuck", "<u4"),
        ("stuck_dirty", "<u4"),
        ("stranded", "<u8"),
        ("stuck_exits", "<u4"),
        ("pad", "<u4"),
        ("stall_hist", "<u8", (HIST_BUCKETS,)),
    ]
)

#: struct kt_vm_key (8 bytes)
VM_KEY_DTYPE = np.dtype([("pid", "<u4"), ("vm", "<i4")])

#: struct kt_vm_val; ring_bytes from KVM_ENABLE_CAP, reset times in ns.
VM_VAL_DTYPE = np.dtype(
    [
        ("ring_bytes", "<u8"),
        ("cap", "<u4"),
        ("vcpus", "<u4"),
        ("reset_ioctls", "<u8"),
        ("reset_ns", "<u8"),
        ("reset_entries", "<u8"),
        ("reset_lat_hist", "<u8", (HIST_BUCKETS,)),
    ]
)

#: struct kt_push_slot (48 bytes): the push fast path's count for the ring at kernel
#: address ``ptr`` (0: free slot), whose row is ``key``; its dirty_index is dirty0 + pushes
#: while the row's ``gen`` is still the slot's. ``seq`` is odd while the owner changes and
#: moves on with every change (a seqlock).
PUSH_SLOT_DTYPE = np.dtype(
    [
        ("ptr", "<u8"),
        ("pushes", "<u8"),
        ("epoch", "<u4"),
        ("dirty0", "<u4"),
        ("key", RING_KEY_DTYPE),
        ("gen", "<u4"),
        ("seq", "<u8"),
    ]
)
