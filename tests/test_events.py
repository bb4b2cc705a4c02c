"""kvmtrace.core.events helpers over EVENT_DTYPE arrays."""

from __future__ import annotations

import numpy as np

from kvmtrace.core.events import empty, vm_keys, vm_pairs


def test_vm_pairs_are_the_distinct_signed_pairs_sorted() -> None:
    ev = empty(9)
    ev["pid"] = [5, 5, 7, 5, 7, 1 << 21, 5, 5, 7]
    ev["vm"] = [-1, 3, -2, -1, 9 | 2 << 20, -3, 3, 3, -2]
    want = sorted(set(zip(ev["pid"].tolist(), ev["vm"].tolist(), strict=True)))
    assert vm_pairs(ev) == want == [(5, -1), (5, 3), (7, -2), (7, 9 | 2 << 20), (1 << 21, -3)]
    assert vm_pairs(empty(0)) == []


def test_vm_keys_tell_vms_apart() -> None:
    ev = empty(4)
    ev["pid"] = [5, 5, 6, 5]
    ev["vm"] = [-1, 3, -1, 3]
    keys = vm_keys(ev)
    assert keys.dtype == np.uint64 and len(set(keys.tolist())) == 3 and keys[1] == keys[3]
