"""The byte layout of one EVENTS block of a kvmtrace recording (docs/FORMAT.md), shared by
its encoder (:mod:`.recording_codec`) and decoder (:mod:`.recording_decode`).

An EVENTS block payload is: :data:`EVENTS_HEADER`; the group table (``ngroups`` rows of
:data:`GROUP_DTYPE`); when there is more than one group, the events' group numbers as one
byte stream (1 or 2 bytes each); then, per column of :data:`DELTA_COLUMNS` in that order,
a :data:`COLUMN_HEADER` and its data: ``MODE_GROUP_CONST`` one value per group (raw), or
``MODE_DELTA`` the frame-of-reference deltas (patches stream first if any, then byte
planes, then bit planes), each a byte stream behind a :data:`STREAM_HEADER`. All
little-endian. Changing any of this changes the file format.
"""

from __future__ import annotations

import struct

import numpy as np

from ..core.columns import GROUP_FIELDS

__all__ = [
    "GROUP_DTYPE", "GROUP_KEYS", "DELTA_COLUMNS", "MAX_BLOCK_EVENTS",
    "EVENTS_HEADER", "COLUMN_HEADER", "STREAM_HEADER",
    "MODE_DELTA", "MODE_GROUP_CONST", "STREAM_STORED", "STREAM_ZLIB",
]

#: One row of a block's group table (20 bytes).
GROUP_DTYPE = np.dtype(
    [("pid", "<u4"), ("tid", "<u4"), ("vm", "<i4"), ("ring", "<i4"), ("kind", "u1"),
     ("pad", "V3")]
)
assert GROUP_DTYPE.itemsize == 20
#: The group table's key fields (an event's group), in storage order.
GROUP_KEYS = ("pid", "tid", "vm", "ring", "kind")
assert GROUP_KEYS == GROUP_FIELDS

#: Coded columns, in storage order: (field, unsigned dtype, delta within group?).
DELTA_COLUMNS: tuple[tuple[str, np.dtype, bool], ...] = (
    ("ts", np.dtype("<u8"), False),
    ("value", np.dtype("<u8"), True),
    ("dirty_index", np.dtype("<u4"), True),
    ("reset_index", np.dtype("<u4"), True),
    ("slot", np.dtype("<u4"), True),
)
MAX_BLOCK_EVENTS = 1 << 16  #: so that group numbers fit in 2 bytes

#: events, groups, group-number bytes (0, 1, 2), columns, reserved
EVENTS_HEADER = struct.Struct("<IIBBH")
#: mode, bits, reserved, patches, lo
COLUMN_HEADER = struct.Struct("<BBHIQ")
#: codec (STREAM_STORED, STREAM_ZLIB), stored bytes, raw bytes
STREAM_HEADER = struct.Struct("<BII")
MODE_DELTA, MODE_GROUP_CONST = 0, 1
STREAM_STORED, STREAM_ZLIB = 0, 1
