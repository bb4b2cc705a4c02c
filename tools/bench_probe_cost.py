#!/usr/bin/env python3
"""What kvmtrace's probes cost per dirty-ring event, measured by the kernel (bpf_stats).

Wall-clock slowdowns (tools/bench_top.py, tools/bench_record.py) are noisy on a shared or
nested-virtualised host; the kernel's own per-program counters are not. For each mode, the
built-in workload runs at its highest sustained push rate (tight guest loop, reaper harvest,
1 MiB rings) with these programs attached, and the push program's ns per run is put beside
the workload's ns per push (vCPU run time / pushes) measured in the same run:

  empty   tests/bpf/empty_push.c: the floor of any probe (dispatch + statistics)
  clock   tests/bpf/clock_push.c: the floor of any probe that timestamps its events (empty
          + one bpf_ktime_get_ns() stored per CPU)
  emit    tests/bpf/emit_push.c: the floor of any probe that records each push with what a
          replay needs (clock + the ring's indices + the task, one 48-byte record per push
          in this CPU's part of an array: kvmtrace's layout without identity or checks)
  top     kvmtrace's probes with in-kernel aggregation (what `kvmtrace top` loads): pushes
          counted by the fast path (an array slot found by the ring's address)
  top-hash the same without the fast path: every push reads the ring and looks up two hash
          maps (how `top` counted before; the snapshots are the same)
  record  kvmtrace's probes emitting every event into the ring of its CPU, read and written
          to a recording by a consumer thread (what `kvmtrace record` does): the VM fd of a
          push from its ring's slot
  record-hash the same, the VM fd from the per-thread hash map
  light   kvmtrace's probes without a push program (what `kvmtrace top --light` loads):
          the push path costs 0; the reset program's ns per reset is shown instead

Besides the push program, every program of the mode is summed: "all ns/push" is their
total run time divided by the pushes of the run (the whole probe cost per push).

Modes alternate for --rounds rounds; medians are printed. Needs root; turns
kernel.bpf_stats_enabled on for the run (announced, restored).

    .venv/bin/python tools/bench_probe_cost.py [--rounds 3] [--seconds 3] [--modes M,M]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from _common import ROOT, Column, Table, parser, reaper_workload, require_root, test_program

from kvmtrace.bpf.progstats import bpf_stats, prog_stats

PUSH = "kvm_dirty_ring_push"
RESET = "kvm_dirty_ring_reset"


def workload(seconds: float) -> tuple[float, int]:
    """Run the workload; (ns per push per vCPU (run time / harvested entries), pushes)."""
    out = subprocess.run(reaper_workload(seconds), capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    rings = json.loads(out)["rings"]
    return (statistics.mean(r["run_ns"] / r["harvested"] for r in rings),
            sum(r["harvested"] for r in rings))


@dataclass
class Row:
    push_runs: int  # runs of the push program (0: none loaded)
    push_ns: float  # its ns per run
    reset_runs: int
    reset_ns: float  # the reset program's ns per run (0: none loaded)
    all_ns: int  # total run time of every program, ns
    ns_push: float  # the workload's ns per push
    pushes: int

    @property
    def all_per_push(self) -> float:
        return self.all_ns / self.pushes if self.pushes else 0.0


def measure(funcs: dict, seconds: float) -> Row:
    """Run the workload with the programs ``funcs`` (bcc BPF.funcs) attached."""
    ns_push, pushes = workload(seconds)
    stats = {(k.decode() if isinstance(k, bytes) else k): prog_stats(f.fd)
             for k, f in funcs.items()}
    push = [s for name, s in stats.items() if PUSH in name]
    reset = [s for name, s in stats.items() if RESET in name]
    return Row(push[0].run_cnt if push else 0, (push[0].ns_per_run or 0.0) if push else 0.0,
               reset[0].run_cnt if reset else 0,
               (reset[0].ns_per_run or 0.0) if reset else 0.0,
               sum(s.run_time_ns for s in stats.values()), ns_push, pushes)


def run_c(name: str, seconds: float) -> Row:
    """The programs of tests/bpf/NAME (no kvmtrace code) on the workload."""
    b = test_program(name)
    try:
        return measure(b.funcs, seconds)
    finally:
        b.cleanup()


def run_empty(seconds: float) -> Row:
    return run_c("empty_push.c", seconds)


def run_clock(seconds: float) -> Row:
    return run_c("clock_push.c", seconds)


def run_emit(seconds: float) -> Row:
    return run_c("emit_push.c", seconds)


def run_top(seconds: float) -> Row:
    from kvmtrace.bpf.loader import Probes

    with Probes("top") as p:
        return measure(p._bpf.funcs, seconds)


def run_top_hash(seconds: float) -> Row:
    from kvmtrace.bpf.loader import Probes

    with Probes("top", fast_push=False) as p:
        return measure(p._bpf.funcs, seconds)


def run_light(seconds: float) -> Row:
    from kvmtrace.bpf.loader import Probes

    with Probes("top-light") as p:
        return measure(p._bpf.funcs, seconds)


def run_record(seconds: float, fast_push: bool = True) -> Row:
    from kvmtrace.bpf.event_source import LiveEvents
    from kvmtrace.source.recording import RecordingWriter

    with tempfile.TemporaryDirectory() as tmp, LiveEvents(fast_push=fast_push) as src, \
            RecordingWriter(Path(tmp) / "bench.kvt", src.meta) as writer:
        def consume() -> None:
            for batch in src.batches():
                if len(batch):
                    writer.write(batch)

        t = threading.Thread(target=consume)
        t.start()
        try:
            return measure(src.probes._bpf.funcs, seconds)
        finally:
            src.stop()
            t.join()


def run_record_hash(seconds: float) -> Row:
    return run_record(seconds, fast_push=False)


TABLE = Table([Column("round", ">5"), Column("mode", ">11"), Column("pushes", ">9"),
               Column("push ns", ">8", ">8.1f"), Column("resets", ">7"),
               Column("rst ns", ">7", ">7.0f"), Column("all ns/push", ">11", ">11.1f"),
               Column("ns/push", ">8", ">8.0f"), Column("share", ">6")])
MODES = {"empty": run_empty, "clock": run_clock, "emit": run_emit, "top": run_top,
         "top-hash": run_top_hash, "light": run_light, "record": run_record,
         "record-hash": run_record_hash}


def main() -> int:
    ap = parser(__doc__, rounds=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--modes", default=",".join(MODES), metavar="M,M",
                    help="modes to run, of: %(default)s (empty is always run: the anchor)")
    args = ap.parse_args()
    modes = ["empty", *(m for m in args.modes.split(",") if m and m != "empty")]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode {bad[0]!r}: use some of {', '.join(MODES)}")
    require_root("bench_probe_cost", "BPF")
    got: dict[str, list[Row]] = {m: [] for m in modes}
    with bpf_stats():
        print(TABLE.header())
        for i in range(args.rounds):
            for mode in modes:
                r = MODES[mode](args.seconds)
                got[mode].append(r)
                print(TABLE.row(i, mode, r.pushes, r.push_ns, r.reset_runs, r.reset_ns,
                                r.all_per_push, r.ns_push,
                                f"{100 * r.all_per_push / r.ns_push:.2f}%"), flush=True)
    print()
    floor = statistics.median(r.push_ns for r in got["empty"])
    for mode in modes:
        ns_run = statistics.median(r.push_ns for r in got[mode])
        ns_all = statistics.median(r.all_per_push for r in got[mode])
        ns_push = statistics.median(r.ns_push for r in got[mode])
        line = (f"{mode:>11}: push program {ns_run:6.1f} ns/run ({ns_run / floor:.2f} x empty"
                f" {floor:.1f}) = "
                f"{100 * ns_run / ns_push:4.1f} % of a push ({ns_push:.0f} ns); all programs "
                f"{ns_all:6.1f} ns/push = {100 * ns_all / ns_push:5.2f} %")
        if mode == "light":
            line += (f"; reset program {statistics.median(r.reset_ns for r in got[mode]):.0f}"
                     " ns/reset")
        print(line)
    print("per round, push program / the same round's empty program: median (min-max)")
    for mode in modes:
        if mode in ("empty", "light"):
            continue
        ratios = [r.push_ns / e.push_ns for r, e in zip(got[mode], got["empty"], strict=True)
                  if e.push_ns]
        print(f"{mode:>11}: {statistics.median(ratios):.2f} x ({min(ratios):.2f}-"
              f"{max(ratios):.2f}) over {len(ratios)} rounds")
    print("goals: top <= 2 %, record <= 5 % of the workload's time and record's push "
          "program <= 2 x empty; light: 0 ns per push on the push path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
