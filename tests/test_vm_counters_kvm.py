"""Per-VM counters on a real run: one recorded run of the built-in VMM (2 vCPUs, soft-full
exits), read back as a file. The VM's KVM_RESET_DIRTY_RINGS count is the VMM's own count of
its calls, its latencies are the recorded KT_RESET_LAT values, and ``top --replay``'s
reset p99 is the log2 bucket holding their 99th percentile, on the VM row and every ring
row alike (the live maps' count is checked in test_probes_kvm)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import kvmtrace_cmd, record_workload, require_kvm_bpf

from kvmtrace.analysis.aggregate import Aggregator
from kvmtrace.core.counters import HIST_BUCKETS, VmCounters, VmKey
from kvmtrace.core.events import Kind
from kvmtrace.source.detect import open_source

pytestmark = pytest.mark.kernel

WORKLOAD = ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "1500", "--passes", "2")


def test_vm_counters_of_a_recorded_run(tmp_path: Path) -> None:
    require_kvm_bpf()
    run = record_workload(tmp_path, *WORKLOAD)
    truth = run.truth
    src = open_source(run.path)
    ev = np.concatenate(list(src.batches()))
    lat = ev["value"][ev["kind"] == Kind.RESET_LAT].astype(np.int64)
    (vm,) = set(ev["vm"][ev["kind"] == Kind.RESET].tolist())
    assert truth["reset_eintr"] == 0 and len(lat) == truth["resets"]  # one per ioctl
    hist = [0] * HIST_BUCKETS
    for v in lat.tolist():
        hist[max(v.bit_length() - 1, 0)] += 1

    agg = Aggregator(src.meta)
    agg.feed(ev)
    snap = agg.snapshot()
    assert snap.vm_counters == {VmKey(truth["pid"], vm): VmCounters(
        reset_ioctls=truth["resets"], reset_ns=int(lat.sum()), reset_lat_hist=hist)}
    assert {k.ring for k in snap.rings} == {0, 1}

    # one interval over the whole file: p99 = upper bound of the bucket of the value of
    # rank ceil(0.99 n) in sorted order
    p99 = 1 << max(int(np.sort(lat)[math.ceil(0.99 * len(lat)) - 1]).bit_length(), 1)
    proc = subprocess.run(kvmtrace_cmd("top", "-b", "--json", "-d", "1000", "--replay",
                                       str(run.path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    last = json.loads(proc.stdout.splitlines()[-1])
    assert [(v["pid"], v["reset_p99_ns"]) for v in last["vms"]] == [(truth["pid"], p99)]
    assert [(r["index"], r["reset_p99_ns"]) for r in last["rings"]] == [(0, p99), (1, p99)]
