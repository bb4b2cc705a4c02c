#!/usr/bin/env python3
"""The kernel verifier's share of a cached start: per program, the instructions it processed
(``verified_insns`` of ``struct bpf_prog_info``) and the CPU of its BPF_PROG_LOAD, for the
probes of ``top`` and ``record`` naming VMs by ``struct kvm *`` (vm_identity ``pointer``),
against the same probes naming VMs by thread (``thread``: no fd-table walk) in the same run.

Each configuration is compiled once with bcc into a temporary probe cache; its programs are
then loaded from that entry through bpf(2) (as a cached start does), each ``--rounds`` times
one after the other, timing the calling thread's CPU (user + system: the verifier runs in
the syscall). Figures: the median per program and the sum of the medians; ``x thread``: the
sum over the sum of the ``thread`` configuration of the same mode. The CPU figures move with
the machine's load (printed at start and end); ``verified_insns`` does not.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import Column, Table, parser, require_root

from kvmtrace.bpf import objcache
from kvmtrace.bpf.loader import Probes
from kvmtrace.bpf.rawload import RawProbes
from kvmtrace.host.bpf_syscall import prog_info

IDENTITIES = {"pointer": "auto", "thread": "thread"}


@dataclass
class Prog:
    name: str
    insns: int  # instructions in the program
    verified: int  # verified_insns
    cpu_ms: list[float]


def _entry(folder: Path) -> objcache.CacheEntry:
    for path in folder.glob("*.json"):
        entry = objcache.load(path.stem)
        if entry.progs:
            return entry
    raise SystemExit(f"no probe entry in {folder}")


def measure(mode: str, identity: str, rounds: int) -> list[Prog]:
    """Compile ``mode`` with ``identity`` into a fresh cache; load each program ``rounds``
    times from it."""
    with tempfile.TemporaryDirectory(prefix="kvmtrace-bench-verifier-") as tmp:
        os.environ["KVMTRACE_CACHE_DIR"] = tmp
        os.environ.pop("KVMTRACE_NO_CACHE", None)
        Probes(mode, pid=os.getpid(), vm_identity=IDENTITIES[identity]).close()
        entry = _entry(Path(tmp))
    raw = RawProbes(entry, {"KT_PID": os.getpid()})
    try:
        out = []
        for p in entry.progs:
            if p.attach is None:
                continue
            name = p.name.encode()
            got = Prog(p.name, len(p.insns) // 8, 0, [])
            for _ in range(rounds):
                old = raw.funcs.pop(name, None)
                if old is not None:
                    os.close(old.fd)
                t0 = time.thread_time()
                fn = raw.load_func(name, p.prog_type)
                got.cpu_ms.append((time.thread_time() - t0) * 1e3)
                got.verified = int(prog_info(fn.fd).verified_insns)
            out.append(got)
        return out
    finally:
        raw.cleanup()


def main() -> int:
    ap = parser(__doc__, rounds=5)
    ap.add_argument("--modes", default="top,record", help="probe modes (top,record)")
    args = ap.parse_args()
    require_root("bench_verifier", "it loads BPF programs")
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} on "
          f"{os.cpu_count()} CPUs at start", flush=True)
    table = Table([Column("mode", "<7"), Column("identity", "<8"), Column("program", "<40"),
                   Column("insns", ">6"), Column("verified", ">9"), Column("cpu ms", ">7"),
                   Column("min-max", ">13")])
    print(table.header(), flush=True)
    totals: dict[tuple[str, str], tuple[int, float]] = {}
    for mode in args.modes.split(","):
        for identity in IDENTITIES:
            progs = measure(mode, identity, args.rounds)
            for p in progs:
                print(table.row(mode, identity, p.name[:40], p.insns, p.verified,
                                f"{statistics.median(p.cpu_ms):.1f}",
                                f"{min(p.cpu_ms):.1f}-{max(p.cpu_ms):.1f}"), flush=True)
            totals[mode, identity] = (sum(p.verified for p in progs),
                                      sum(statistics.median(p.cpu_ms) for p in progs))
    print(f"\nsums of the per-program medians over {args.rounds} loads each")
    for (mode, identity), (verified, cpu) in totals.items():
        v0, c0 = totals[mode, "thread"]
        print(f"{mode:<7} {identity:<8} verified {verified:>8} (x thread {verified / v0:.1f})"
              f"  cpu {cpu:7.1f} ms (x thread {cpu / c0:.1f})")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
