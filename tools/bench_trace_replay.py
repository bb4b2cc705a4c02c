#!/usr/bin/env python3
"""Benchmark trace-driven workloads (issue J, item 5): how fast ``workload --replay``
dirties pages compared with the workload it replays, measured side by side, as root.

One recording of ``kvmtrace workload`` (random order, 2 vCPUs, an I/O exit every 16
writes) is made with ``record``; then, ``--rounds`` times, the same workload and its replay
run alternately (not recorded) and each reports its pushes per second per vCPU (harvested
entries / vCPU run time, from its own ``--json``). Prints the rates and the ratio replay /
source per round and the median ratio; the replay also reads the trace and builds its
tables before the guest runs (``plan s``: the wall time of ``workload --replay`` minus the
guest's).

    .venv/bin/python tools/bench_trace_replay.py [--rounds 5]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Column, Table, kvmtrace_cmd, parser, require_root

SOURCE = ["--vcpus", "2", "--pages", "20000", "--pattern", "random", "--exit-every", "16",
          "--ring-bytes", "65536"]


def rate(cmd: list[str]) -> tuple[float, float, float]:
    """(pushes/s per vCPU, wall seconds of the command, guest seconds) of one run."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.monotonic() - t0
    res = json.loads(proc.stdout)
    rates = [r["harvested"] * 1e9 / r["run_ns"] for r in res["rings"]]
    return sum(rates) / len(rates), wall, res["wall_ns"] / 1e9


def main() -> int:
    args = parser(__doc__, rounds=5).parse_args()
    require_root("bench_trace_replay", "BPF for the recording, /dev/kvm", kvm=True)
    with tempfile.TemporaryDirectory(prefix="kvmtrace-bench-trace-") as tmp:
        kvt = Path(tmp) / "src.kvt"
        subprocess.run(kvmtrace_cmd("record", "-o", str(kvt), "--",
                                    *kvmtrace_cmd("workload", *SOURCE)),
                       capture_output=True, check=True)
        table = Table([Column("round", ">5"), Column("source/s", ">10", ">10.0f"),
                       Column("replay/s", ">10", ">10.0f"), Column("ratio", ">6", ">6.2f"),
                       Column("plan s", ">7", ">7.2f")])
        print("load: the machine is shared; rates are per vCPU, side by side per round")
        print(table.header())
        ratios = []
        for i in range(args.rounds):
            src, _, _ = rate(kvmtrace_cmd("workload", "--json", *SOURCE))
            rep, wall, guest = rate(kvmtrace_cmd("workload", "--json", "--replay", str(kvt),
                                                 "--exit-every", "16"))
            ratios.append(rep / src)
            print(table.row(i + 1, src, rep, rep / src, wall - guest), flush=True)
        print(f"median replay/source push rate: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
