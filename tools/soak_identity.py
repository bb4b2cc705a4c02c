#!/usr/bin/env python3
"""Soak the VM identity scenarios (issue F, item 1) on real VMs, as root.

Each scenario is one test of tests/test_identity_kvm.py, checked exactly against the
built-in VMM's ground truth; racy by nature (the probes attach while VMs run, VMs reuse
fds and kernel memory), so each runs --runs times, every run in its own pytest process
(so a failure reports pytest's own assertion message). Prints per scenario the runs and
every anomaly (a failed run, with its first assertion lines); exit 1 if any.

  record-p       record -p PID on a VM created before the recorder (raw tracepoints)
  record-p-tp    the same with tracepoint hooks (identity from the vCPU fd of KVM_RUN)
  record-all     system-wide record on such a VM (its events filtered by pid)
  replay-clean   replay of a record -p of a running VM: no lost pushes, no anomalies
                 (needs replay's causal order, issue F item 2)
  top-old-vms    two VMs of one process created before the probes, then a VM reusing one
                 of their fds: top (fast path, hash path, tracepoints, light) and events
  top-reuse      three VMs one after the other under one fd (gen 0, 1, 2), every mode
  replay-reuse   record + replay of those three VMs: three sets of rings, clean
  fd-walk        VMs created before the probes named by the fd-table walk alone
  fd-walk-high   the same with the VM fds past the walk's first three 16-fd reads

    .venv/bin/python tools/soak_identity.py [--runs 20] [--only NAME ...]
"""

from __future__ import annotations

import sys

from _common import soak_tests

TESTS = "tests/test_identity_kvm.py::"
SCENARIOS = {
    "record-p": "test_record_of_a_running_vm_has_one_identity[auto-True]",
    "record-p-tp": "test_record_of_a_running_vm_has_one_identity[tp-True]",
    "record-all": "test_record_of_a_running_vm_has_one_identity[auto-False]",
    "replay-clean": "test_replay_of_a_recording_attached_to_a_running_vm_is_clean",
    "top-old-vms": "test_two_vms_created_before_the_probes_and_a_reused_fd",
    "top-reuse": "test_reused_fd_gives_a_new_gen",
    "replay-reuse": "test_record_and_replay_keep_reused_fds_apart",
    "fd-walk": "test_fd_table_walk_names_vms_without_the_debugfs_name[low-fds]",
    "fd-walk-high": "test_fd_table_walk_names_vms_without_the_debugfs_name[fds-past-45]",
}


def main() -> int:
    return soak_tests(__doc__, "soak_identity", "BPF, /dev/kvm", TESTS, SCENARIOS)


if __name__ == "__main__":
    sys.exit(main())
