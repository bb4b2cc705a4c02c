#!/usr/bin/env python3
"""Soak the VM identity scenarios (issue F, item 1) on real VMs, as root.

Each scenario is one of tests/test_identity_kvm.py's, checked exactly against the built-in
VMM's ground truth; racy by nature (the probes attach while VMs run, VMs reuse fds and
kernel memory), so each runs --runs times. Prints per scenario the runs and every anomaly
(a failed check, with its message); exit 1 if any.

  record-p       record -p PID on a VM created before the recorder (raw tracepoints)
  record-p-tp    the same with tracepoint hooks (identity from the vCPU fd of KVM_RUN)
  record-all     system-wide record on such a VM (the replay filtered to its pid)
  top-old-vms    two VMs of one process created before the probes, then a VM reusing one
                 of their fds: top (fast path, hash path, tracepoints, light) and events
  top-reuse      three VMs one after the other under one fd (gen 0, 1, 2), every mode

    .venv/bin/python tools/soak_identity.py [--runs 20] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_identity_kvm as t  # noqa: E402


def _record(hook: str, by_pid: bool) -> Callable[[], None]:
    def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            t.test_record_of_a_running_vm_has_one_identity(Path(tmp), None, None, hook, by_pid)
    return run


SCENARIOS: dict[str, Callable[[], None]] = {
    "record-p": _record("auto", True),
    "record-p-tp": _record("tp", True),
    "record-all": _record("auto", False),
    "top-old-vms": lambda: t.test_two_vms_created_before_the_probes_and_a_reused_fd(None, None),
    "top-reuse": lambda: t.test_reused_fd_gives_a_new_gen(None, None),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("soak_identity: needs root (BPF, /dev/kvm)", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("soak_identity: --runs must be >= 1", file=sys.stderr)
        return 2
    os.environ["PYTHONPATH"] = str(ROOT)  # the workloads import this checkout
    names = args.only or list(SCENARIOS)
    bad = 0
    for name in names:
        anomalies: list[str] = []
        t0 = time.monotonic()
        for i in range(args.runs):
            try:
                SCENARIOS[name]()
            except AssertionError as err:
                last = traceback.extract_tb(err.__traceback__)[-1]
                msg = " ".join(str(err).split())[:300]
                anomalies.append(f"run {i}: {Path(last.filename).name}:{last.lineno}: {msg}")
        bad += len(anomalies)
        print(f"{name:>12}: {args.runs} runs, {len(anomalies)} anomalies "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
        for a in anomalies:
            print(f"{'':>14}{a}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
