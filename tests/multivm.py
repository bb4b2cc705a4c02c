"""Run N built-in VMs at once in one process and print their ground truth (a JSON list of
``kvmtrace workload --json`` objects, one per VM), for tests of text traces that cannot
tell VMs apart. Until ``kvmtrace workload --vms N`` exists this is the way to get two VMs
in one process.

Usage: python tests/multivm.py N [--wait] [--cycles K] WORKLOAD-FLAGS... (the flags of
`kvmtrace workload`); the list is in (cycle, VM) order. ``--wait``: read one line from
stdin before creating the VMs (a tracer can first filter on this pid).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from kvmtrace.vmm.workload import STOP_SIGNAL, WorkloadConfig, run_workload


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("vms", type=int)
    p.add_argument("--wait", action="store_true")
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--ring-bytes", type=int, default=4096)
    p.add_argument("--pages", type=int, default=1000)
    p.add_argument("--cycles", type=int, default=1,
                   help="each thread runs its VM this many times in a row (a new VM, new "
                   "vCPU threads, usually the same fd)")
    p.add_argument("--pages-step", type=int, default=0,
                   help="VM k dirties pages + k * STEP pages (VMs that end differently)")
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--duration", type=float)
    p.add_argument("--exit-every", type=int, default=1)
    p.add_argument("--harvest", default="on-full")
    p.add_argument("--reaper-ms", type=float, default=10.0)
    a = p.parse_args(argv)
    signal.signal(STOP_SIGNAL, lambda *_: None)  # vCPU threads are kicked with it
    if a.wait:
        sys.stdin.readline()
    cfgs = [WorkloadConfig(vcpus=a.vcpus, ring_bytes=a.ring_bytes,
                           pages=a.pages + k * a.pages_step, passes=a.passes,
                           duration_s=a.duration, exit_every=a.exit_every,
                           harvest=a.harvest, reaper_ms=a.reaper_ms) for k in range(a.vms)]
    results: list[list[dict]] = [[] for _ in range(a.vms)]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            for _ in range(a.cycles):
                results[i].append(run_workload(cfgs[i]).to_dict())
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(a.vms)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        print(f"multivm: {errors[0]}", file=sys.stderr)
        return 1
    print(json.dumps([r for cycle in zip(*results, strict=True) for r in cycle]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
