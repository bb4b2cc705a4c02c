#!/usr/bin/env python3
"""What tracing costs a dirtying QEMU guest: QEMU's own dirty rate with and without kvmtrace.

One QEMU (the multiboot guest of kvmtrace.vmm.multiboot, 2 vCPUs, 4096-entry rings) runs
for the whole benchmark. Each round measures every mode once, in a rotated order:

  none        nothing attached
  top         kvmtrace top -b --json -p QEMU_PID (full mode: a program on every push)
  top-light   kvmtrace top -b --json --light -p QEMU_PID (nothing on the push)
  record      kvmtrace record -p QEMU_PID -o FILE
  perf        perf record -e kvm:kvm_dirty_ring_{push,reset,exit} -p QEMU_PID -o FILE

A mode's figure is QEMU's own ``calc-dirty-rate`` (mode dirty-ring, 2 s): the VM's dirty
rate in MB/s while the tracer is attached (QEMU pushes only while dirty logging is on, so
the calc is the workload). It is divided by the same round's ``none``; the table gives the
median ratio and its spread, and the tracer's own CPU (utime + stime over the calc, % of
one core). Run as root; needs QEMU (tools/setup.sh --test) and perf for the perf row.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import Column, Table, cpu_seconds, kvmtrace_cmd, parser, require_root

from kvmtrace.testing.qemu import Qemu, qemu_binary
from kvmtrace.vmm.multiboot import MultibootGuest

MODES = ["none", "top", "top-light", "record", "perf"]
PERF_EVENTS = ["-e", "kvm:kvm_dirty_ring_push", "-e", "kvm:kvm_dirty_ring_reset",
               "-e", "kvm:kvm_dirty_ring_exit"]
READY = {"top": "Hit Ctrl-C to end.", "top-light": "Hit Ctrl-C to end.",
         "record": "Hit Ctrl-C to end."}


def tracer_argv(mode: str, pid: int, out: Path) -> list[str] | None:
    """The tracer's command line for ``mode`` attached to QEMU ``pid``; None for none."""
    if mode == "none":
        return None
    if mode == "top":
        return kvmtrace_cmd("top", "-b", "--json", "-p", str(pid), "-d", "1")
    if mode == "top-light":
        return kvmtrace_cmd("top", "-b", "--json", "--light", "-p", str(pid), "-d", "1")
    if mode == "record":
        return kvmtrace_cmd("record", "-p", str(pid), "-o", str(out))
    return ["perf", "record", "-q", *PERF_EVENTS, "-p", str(pid), "-o", str(out)]


def attach(argv: list[str], mode: str) -> subprocess.Popen:
    """Start the tracer and wait until it is attached: kvmtrace says "Hit Ctrl-C to end."
    once its probes are loaded; perf attaches within its start (1 s allowed)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if mode == "perf":
        time.sleep(1.0)
        return proc
    assert proc.stderr is not None
    for line in proc.stderr:
        if READY[mode] in line:
            return proc
    raise SystemExit(f"bench_qemu: {mode} exited before it was attached "
                     f"(status {proc.wait()})")


def measure(qemu: Qemu, mode: str, tmp: Path) -> tuple[int, float]:
    """(QEMU's dirty rate MB/s, the tracer's CPU % of one core) of one calc under ``mode``."""
    out = tmp / f"{mode}.data"
    argv = tracer_argv(mode, qemu.pid, out)
    proc = attach(argv, mode) if argv else None
    try:
        cpu0 = cpu_seconds(proc.pid) if proc else 0.0
        t0 = time.monotonic()
        rate = qemu.calc_dirty_rate(2)
        cpu = (cpu_seconds(proc.pid) - cpu0) if proc else 0.0
        return rate.dirty_rate, 100 * cpu / (time.monotonic() - t0)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.unlink(missing_ok=True)


def main() -> int:
    ap = parser(__doc__, rounds=5)
    args = ap.parse_args()
    require_root("bench_qemu", "BPF, perf tracepoints and /dev/kvm", kvm=True)
    if qemu_binary() is None:
        print("bench_qemu: qemu-system-x86_64 is not installed (tools/setup.sh --test)")
        return 2
    modes = [m for m in MODES if m != "perf" or shutil.which("perf")]
    rates: dict[str, list[int]] = {m: [] for m in modes}
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    cpus: dict[str, list[float]] = {m: [] for m in modes}
    guest = MultibootGuest(vcpus=2, pages=16384, exit_every=16)
    with Qemu(guest, ring_entries=4096, name="bench") as qemu, \
            tempfile.TemporaryDirectory(prefix="bench-qemu-") as tmpdir:
        qemu.wait_guest()
        qemu.calc_dirty_rate(1)  # warm up: first faults of the guest's pages
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            got = {m: measure(qemu, m, Path(tmpdir)) for m in order}
            for m, (rate, cpu) in got.items():
                rates[m].append(rate)
                cpus[m].append(cpu)
                if got["none"][0]:
                    ratios[m].append(rate / got["none"][0])
            print(f"round {r}: " + ", ".join(f"{m} {got[m][0]}" for m in modes), flush=True)
    table = Table([Column("mode", "<10"), Column("MB/s med", ">9", ">9.0f"),
                   Column("vs none", ">8", ">8.3f"), Column("min", ">7", ">7.3f"),
                   Column("max", ">7", ">7.3f"), Column("tracer CPU %", ">13", ">13.1f")])
    print(f"QEMU {guest.vcpus} vCPUs, calc-dirty-rate 2 s per figure, {args.rounds} rounds"
          f" (pid {os.getpid()})")
    print(table.header())
    for m in modes:
        print(table.row(m, statistics.median(rates[m]), statistics.median(ratios[m]),
                        min(ratios[m]), max(ratios[m]), statistics.median(cpus[m])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
