#!/usr/bin/env python3
"""Soak trace-driven workloads (issue J, item 5) on real VMs, as root.

Each run records ``kvmtrace workload`` (``record -- workload ...``), reruns that recording
with ``workload --replay`` under ``record`` again, and checks that the two recordings hold,
ring by ring, the same multiset of pushed (slot, offset); where the source lost no page the
replay's harvest (``--dump-harvest``, every entry its VMM collected, in ring order) must
also equal the source's. Scenarios (``--runs`` runs each, the seed varying per run):

- random: 2 vCPUs x 500 pages in random order, 2 passes, on-full harvesting;
- hot-reaper: 2 vCPUs x 400 pages with hot-set re-writes, an I/O exit every 4 writes,
  a reaper every 1 ms (the replay keeps those harvest flags);
- overflow: 1 vCPU writing 300 pages with no exit into a 256-entry ring (the kernel
  overwrites entries, or not, run to run); the replay exits after every write, so it
  overflows nothing but must push the same 300 entries.

Prints one row per scenario and every failure; exit 1 if any.

    .venv/bin/python tools/soak_trace_replay.py [--runs 20] [--scenario random]
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

from _common import Column, Table, parser, repeat, require_root
from conftest import record_workload
from test_trace_replay_kvm import push_multisets

SCENARIOS = {
    "random": (["--vcpus", "2", "--pages", "500", "--passes", "2", "--pattern", "random"],
               []),
    "hot-reaper": (["--vcpus", "2", "--pages", "400", "--pattern", "hot", "--exit-every",
                    "4", "--harvest", "reaper", "--reaper-ms", "1"],
                   ["--exit-every", "4", "--harvest", "reaper", "--reaper-ms", "1"]),
    "overflow": (["--pages", "300", "--exit-every", "0"], []),
}


class Scenario:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seed = 0
        self.pushes = 0
        self.overflowed = 0

    def run(self) -> str | None:
        try:
            why = self._run()
        except Exception as err:  # noqa: BLE001 - a failed run, not the end of the soak
            why = f"seed {self.seed}: error: {type(err).__name__}: {str(err)[-400:]}"
        if why is not None:  # as it happens: a soak is long
            print(f"  {self.name} FAIL {why}", flush=True)
        return why

    def _run(self) -> str | None:
        self.seed += 1
        source_args, replay_args = SCENARIOS[self.name]
        with tempfile.TemporaryDirectory(prefix="kvmtrace-soak-trace-") as tmp:
            src = record_workload(Path(tmp) / "src", *source_args, "--seed", str(self.seed))
            rep = record_workload(Path(tmp) / "rep", "--replay", str(src.path), *replay_args)
            (a, lost_a), (b, lost_b) = push_multisets(src.path), push_multisets(rep.path)
            if lost_a or lost_b:
                return f"seed {self.seed}: the tracer lost events ({lost_a}, {lost_b})"
            if a != b:
                diff = {r: (a.get(r, Counter()) - b.get(r, Counter())).total()
                        + (b.get(r, Counter()) - a.get(r, Counter())).total()
                        for r in set(a) | set(b)}
                return f"seed {self.seed}: push multisets differ, per ring {diff}"
            self.pushes += sum(c.total() for c in a.values())
            if rep.truth["lost_suspected"]:
                return f"seed {self.seed}: the replay lost pages"
            if src.truth["lost_suspected"]:
                self.overflowed += 1
                return None
            if [r["harvested"] for r in src.dump["rings"]] != [
                    r["harvested"] for r in rep.dump["rings"]]:
                return f"seed {self.seed}: harvests differ"
        return None


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), action="append",
                    help="run only this scenario (repeatable; default: all)")
    args = ap.parse_args()
    require_root("soak_trace_replay", "BPF, /dev/kvm", kvm=True)
    table = Table([Column("scenario", "<11"), Column("passed", ">9"), Column("pushes", ">9"),
                   Column("src overflowed", ">14"), Column("s", ">5")])
    print(table.header())
    failures = []
    for name in args.scenario or SCENARIOS:
        sc = Scenario(name)
        out = repeat(sc.run, args.runs)
        print(table.row(name, f"{out.runs - len(out.failures)}/{out.runs}", sc.pushes,
                        sc.overflowed, f"{out.seconds:.0f}"), flush=True)
        failures += [f"{name} {f}" for f in out.failures]
    for failure in failures:
        print(f"  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
