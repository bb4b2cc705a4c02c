#!/usr/bin/env python3
"""Soak: run each racy scenario of the built-in VMM N times and check its ground truth.

    .venv/bin/python tools/soak_workload.py [--runs N] [--only NAME ...]   (root, /dev/kvm)

Scenarios (issue F, item 9): several VMs with VM cycles (fd reuse), interrupted resets,
migrated vCPUs, overflow aftermath (tight loop, stuck ring, livelock), the fast reaper
(tight loop, reaper every 1 ms) and a reaper with an exit every 8 writes. Every run is
checked against what the VMM cannot make up: the guest's own write counter, the kernel's
return values (fds, entries reset) and the layout of the pages the guest writes. Prints one
row per scenario: runs, runs with anomalies, and what happened (cut-short resets, stuck
rings, livelocks, lost pages), then each anomaly seen.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from _common import Column, Table, parser, require_root

from kvmtrace.vmm.guest import GuestLayout
from kvmtrace.vmm.helpers import usable_cpus
from kvmtrace.vmm.truth import WorkloadResult
from kvmtrace.vmm.workload import WorkloadConfig, run_workload


def common(res: WorkloadResult) -> list[str]:
    """Laws of every run: the kernel's reset counts agree with the rings read back, every
    harvested entry is a page this vCPU wrote, reset or left unreset by a stuck ring."""
    bad = []
    if res.reset_mismatch:
        bad.append(f"reset_mismatch {res.reset_mismatch}")
    if res.reset_returned != res.entries_reset:
        bad.append(f"reset_returned {res.reset_returned} != entries_reset "
                   f"{res.entries_reset}")
    for r in res.rings:
        name = f"c{r.cycle} vm{r.vm_fd} r{r.index}"
        if r.unexpected:
            bad.append(f"{name}: {r.unexpected} unexpected entries")
        if r.entries_reset + r.unreset != r.harvested:
            bad.append(f"{name}: reset {r.entries_reset} + unreset {r.unreset} != "
                       f"harvested {r.harvested}")
        if len(r.lost_pages) != r.lost_suspected:
            bad.append(f"{name}: lost_pages {len(r.lost_pages)} != lost {r.lost_suspected}")
        if r.left_dirty and not r.livelock and not r.halted:
            bad.append(f"{name}: stuck ring (left_dirty {r.left_dirty}) not reported")
        if r.livelock and not (r.left_dirty or r.unreset):
            bad.append(f"{name}: livelock reported on a ring that is not stuck")
    return bad


def single_write(res: WorkloadResult, layout: GuestLayout) -> list[str]:
    """No page written twice: every write pushed once, so writes = harvested + lost and
    the lost pages are exactly the written pages never harvested."""
    bad = []
    logs = res.harvest_log or []
    for r, log in zip(res.rings, logs, strict=True):
        name = f"c{r.cycle} vm{r.vm_fd} r{r.index}"
        if r.distinct_written != r.pages_written:
            bad.append(f"{name}: a page was written twice ({r.pages_written} writes)")
            continue
        if r.pages_written != r.harvested + r.lost_suspected:
            bad.append(f"{name}: writes {r.pages_written} != harvested {r.harvested} + "
                       f"lost {r.lost_suspected}")
        written = {(0, p) for p in layout.visits(r.index)[:r.pages_written]}
        if len(set(log)) != len(log):
            bad.append(f"{name}: an entry was harvested twice")
        if r.lost_pages != [list(p) for p in sorted(written - set(log))]:
            bad.append(f"{name}: lost_pages differ from written - harvested")
    return bad


def exact(res: WorkloadResult, writes: int) -> list[str]:
    bad = []
    for r in res.rings:
        got = (r.pages_written, r.harvested, r.entries_reset, r.lost_suspected, r.left_dirty)
        if got != (writes, writes, writes, 0, 0):
            bad.append(f"c{r.cycle} vm{r.vm_fd} r{r.index}: written/harvested/reset/lost/"
                       f"left {got}, want {writes} x3, 0, 0")
    return bad


def vms_cycles(res: WorkloadResult) -> list[str]:
    bad = exact(res, 1000)
    first = {i: (v["vm_fd"], v["vcpu_fds"]) for i, v in enumerate(res.vm_runs[:res.vms])}
    for i, v in enumerate(res.vm_runs):
        if (v["vm_fd"], v["vcpu_fds"]) != first.get(i % res.vms):
            bad.append(f"cycle {v['cycle']} VM {i % res.vms}: fds {v['vm_fd']} "
                       f"{v['vcpu_fds']} not reused")
        if v["resets"] != 2 * 5 + 1 or v["vm_gen"] != v["cycle"]:
            bad.append(f"cycle {v['cycle']} VM {i % res.vms}: resets {v['resets']} gen "
                       f"{v['vm_gen']}")
    return bad


def interrupted(res: WorkloadResult) -> list[str]:
    bad = exact(res, 66000)
    fulls = sum(r.soft_full_exits for r in res.rings)
    if res.resets != fulls + 1 + res.reset_eintr:
        bad.append(f"resets {res.resets} != exits {fulls} + 1 + cut {res.reset_eintr}")
    if res.reset_eintr > res.interrupts_sent:
        bad.append(f"{res.reset_eintr} cut-short resets from {res.interrupts_sent} signals")
    return bad


def migrated(res: WorkloadResult) -> list[str]:
    bad = exact(res, 9000)
    for r in res.rings:
        if r.cpus != usable_cpus() or not r.migrations:
            bad.append(f"r{r.index}: cpus {r.cpus}, {r.migrations} moves")
    return bad


def aftermath(res: WorkloadResult) -> list[str]:
    """Tight loop into 256 entries, 20000 pages: every ring overflows, gets stuck and is
    stopped as a livelock before the guest's last write."""
    bad = []
    for r in res.rings:
        stuck = r.left_dirty + r.unreset > 0
        if not (r.lost_suspected and stuck and r.livelock and not r.halted):
            bad.append(f"ring lost {r.lost_suspected} stuck {stuck} livelock {r.livelock} "
                       f"halted {r.halted}")
    return bad


@dataclass
class Scenario:
    name: str
    config: WorkloadConfig
    check: Callable[[WorkloadResult], list[str]]
    layout: GuestLayout | None = None  # every page written at most once: check that too


SCENARIOS = [
    Scenario("vms-cycles", WorkloadConfig(vms=2, vcpus=2, vm_cycles=3, pages=1000),
             vms_cycles),
    Scenario("interrupt-resets", WorkloadConfig(vcpus=2, ring_bytes=1 << 20, pages=66000,
                                                exit_every=64, interrupt_resets=True),
             interrupted, GuestLayout(2, 66000)),
    Scenario("migrate", WorkloadConfig(vcpus=2, pages=3000, passes=3, migrate_ms=5),
             migrated),
    Scenario("overflow-aftermath", WorkloadConfig(vms=2, vm_cycles=2, ring_bytes=4096,
                                                  pages=20000, exit_every=0),
             aftermath, GuestLayout(1, 20000)),
    Scenario("fast-reaper", WorkloadConfig(vms=2, vm_cycles=2, ring_bytes=16384, pages=8000,
                                           exit_every=0, harvest="reaper", reaper_ms=1),
             lambda res: [], GuestLayout(1, 8000)),
    Scenario("reaper-exit8", WorkloadConfig(vms=2, vm_cycles=2, ring_bytes=16384,
                                            pages=8000, exit_every=8, harvest="reaper"),
             lambda res: exact(res, 8000), GuestLayout(1, 8000)),
]


@dataclass
class Tally:
    runs: int = 0
    bad_runs: int = 0
    seconds: float = 0.0
    stats: Counter[str] = field(default_factory=Counter)
    anomalies: Counter[str] = field(default_factory=Counter)


def soak(sc: Scenario, runs: int) -> Tally:
    tally = Tally()
    sc.config.keep_harvest = sc.layout is not None
    for _ in range(runs):
        t0 = time.monotonic()
        try:
            res = run_workload(sc.config)
        except Exception as err:  # a crash is an anomaly of the run, not of the soak
            tally.runs += 1
            tally.bad_runs += 1
            tally.anomalies[f"error: {err}"] += 1
            continue
        tally.seconds += time.monotonic() - t0
        tally.runs += 1
        bad = common(res) + sc.check(res)
        if sc.layout is not None:
            bad += single_write(res, sc.layout)
        tally.bad_runs += bool(bad)
        tally.anomalies.update(bad)
        tally.stats["cut"] += res.reset_eintr
        tally.stats["sent"] += res.interrupts_sent
        tally.stats["stuck"] += sum(1 for r in res.rings if r.left_dirty or r.unreset)
        tally.stats["livelock"] += sum(1 for r in res.rings if r.livelock)
        tally.stats["lost"] += res.lost_suspected
        tally.stats["rings"] += len(res.rings)
    return tally


TABLE = Table([Column("scenario", "<19"), Column("runs", ">4"), Column("bad", ">4"),
               Column("rings", ">6"), Column("cut", ">5"), Column("sent", ">5"),
               Column("stuck", ">5"), Column("livelk", ">6"), Column("lost", ">7"),
               Column("s/run", ">6", ">6.2f")])


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--only", nargs="*", metavar="NAME",
                    help=f"scenarios to run ({', '.join(s.name for s in SCENARIOS)})")
    args = ap.parse_args()
    require_root("soak_workload", "/dev/kvm", kvm=True)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    print(TABLE.header())
    failed = []
    for sc in chosen:
        t = soak(sc, args.runs)
        s = t.stats
        print(TABLE.row(sc.name, t.runs, t.bad_runs, s["rings"], s["cut"], s["sent"],
                        s["stuck"], s["livelock"], s["lost"], t.seconds / max(t.runs, 1)),
              flush=True)
        if t.anomalies:
            failed.append((sc.name, t.anomalies))
    for name, anomalies in failed:
        print(f"\n{name}: anomalies")
        for text, count in anomalies.most_common(20):
            print(f"  {count:>4} x {text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
