#!/usr/bin/env python3
"""Soak record's per-CPU ring buffers (issue K, item 1) on real VMs, as root.

Each scenario is one test of tests/test_record_kvm.py, checked exactly against the built-in
VMM's own counts; racy by nature (vCPU threads move between CPUs, so a ring's events pass
through several buffers that the reader merges; the reader competes with the vCPUs for
CPUs), so each runs --runs times, every run in its own pytest process. Prints per scenario
the runs and every anomaly (a failed run, with its first assertion lines); exit 1 if any.

  many-vcpus   3 vCPU threads per CPU re-pinned every 5 ms, tight loop, 4 MiB buffer per
               CPU: 0 lost, every ring's pushes 1, 2, 3, ... in the recording
  exact        2 vCPUs with exits: every push, exit, stall, reset as the VMM counted
  full-rate    2 vCPUs at the highest push rate, 1 MiB buffer per CPU: 0 lost (the run
               fails when a busy host never reaches the rate)

    .venv/bin/python tools/soak_percpu.py [--runs 20] [--only NAME ...]
"""

from __future__ import annotations

import sys

from _common import soak_tests

TESTS = "tests/test_record_kvm.py::"
SCENARIOS = {
    "many-vcpus": "test_many_vcpus_moving_between_cpus_lose_nothing_and_keep_index_order",
    "exact": "test_record_matches_ground_truth",
    "full-rate": "test_small_ring_buffer_at_full_rate_loses_nothing",
}


def main() -> int:
    return soak_tests(__doc__, "soak_percpu", "BPF, /dev/kvm", TESTS, SCENARIOS)


if __name__ == "__main__":
    sys.exit(main())
