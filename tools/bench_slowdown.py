#!/usr/bin/env python3
"""Slowdown of one long-running guest while tracers attach and detach in turn (issue K1).

bench_record.py starts a fresh workload per tracer and compares whole runs; on a host whose
own speed drifts by 2x between runs that comparison cannot see a few percent. Here one
workload (the benchmarks' sustained workload: 2 vCPUs, tight guest loop, 1 MiB rings, a
reaper every 10 ms) runs the whole time and reports, every 50 ms, the entries its reaper
harvested per ring and each vCPU thread's CPU time (``kvmtrace workload --progress-ms``: the
VMM's own counts, not the tracer's). Windows of ``--window`` seconds follow each other:

    none, kvmtrace, none, perf, none, kvmtrace, none, perf, ..., none

where ``kvmtrace`` is ``kvmtrace record -p PID`` and ``perf`` is ``perf record -p PID -e
kvm:kvm_dirty_ring_{push,reset,exit}`` (``--tracers`` may add ``top``: ``kvmtrace top -b -p
PID``, the aggregating probes with no event stream, and the floors ``empty``, ``clock`` and
``emit``: tests/bpf/empty_push.c, clock_push.c and emit_push.c alone, the least any probe on
the push tracepoint costs, and any that timestamps, or records, each push, with no reader at
all), each attached before its window opens
(after its start-up, plus ``--settle`` s) and stopped with SIGINT after it closes. Each traced
window's rate (guest writes/s/vCPU) is compared with the mean of the untraced windows either
side of it, which cancels a drift slower than a window. Printed per traced window and as
median and spread: the slowdown by rate, and by the vCPU threads' CPU time per write (what
the probes add to each write, not grown by waiting for a CPU). The untraced windows against
each other (each against the mean of its neighbours) give the noise floor: a slowdown
smaller than that spread cannot be told from none.

    .venv/bin/python tools/bench_slowdown.py [--rounds 6] [--window 3] [--settle 0.5]
                                             [--tracers kvmtrace,perf]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import kvmtrace_cmd, parser, reaper_workload, require_root, test_program

from kvmtrace.source.recording import open_recording

PERF_EVENTS = ["-e", "kvm:kvm_dirty_ring_push", "-e", "kvm:kvm_dirty_ring_reset",
               "-e", "kvm:kvm_dirty_ring_exit"]
PROGRESS_MS = 50
MAX_RUN_S = 3600  # the workload's --duration: it is stopped (SIGINT) when the windows end
#: tracers that are one program of tests/bpf/ alone (loaded by this script as a child)
FLOORS = {"empty": "empty_push.c", "clock": "clock_push.c", "emit": "emit_push.c"}
TRACERS = ("kvmtrace", "perf", "top", *FLOORS)


@dataclass
class Progress:
    """The workload's progress lines, read on a thread: (t_ns, harvested, cpu_ns) summed
    over its rings."""

    lines: list[tuple[int, int, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ended: bool = False

    def read(self, stream) -> None:  # type: ignore[no-untyped-def]
        for raw in stream:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(obj, dict) or obj.get("progress") != 1:
                continue
            rings = obj["rings"]
            with self.lock:
                self.lines.append((obj["t_ns"], sum(r["harvested"] for r in rings),
                                   sum(r["cpu_ns"] for r in rings), len(rings)))
        self.ended = True

    def at(self, t_ns: int) -> tuple[int, int, int, int]:
        """The first line taken at or after ``t_ns`` (waits for it)."""
        while True:
            found = None
            with self.lock:  # the earliest line at or after t_ns: scan back from the end
                for line in reversed(self.lines):
                    if line[0] < t_ns:
                        break
                    found = line
            if found is not None:
                return found
            if self.ended:
                raise SystemExit("the workload ended before the windows did")
            time.sleep(PROGRESS_MS / 4e3)


@dataclass
class Window:
    mode: str
    rate: float = 0.0  # guest writes per second per vCPU
    cpu_per_write: float = 0.0  # vCPU thread ns on CPU per guest write
    lost: int | None = None
    events: int | None = None


def measure(progress: Progress, mode: str, seconds: float) -> Window:
    t1 = progress.at(time.monotonic_ns())
    time.sleep(seconds)
    t2 = progress.at(time.monotonic_ns())
    writes = t2[1] - t1[1]
    return Window(mode, rate=writes / ((t2[0] - t1[0]) / 1e9) / t2[3],
                  cpu_per_write=(t2[2] - t1[2]) / max(1, writes))


def attached(proc: subprocess.Popen, out: Path, mode: str, err: Path, deadline: float) -> None:
    """Wait until the tracer is attached: kvmtrace says so on stderr; perf has written the
    header of its output file."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{mode} ended early: {err.read_text()[-400:]}")
        if mode == "perf" and out.exists() and out.stat().st_size:
            return
        if mode != "perf" and "Hit Ctrl-C" in err.read_text():
            return
        time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"{mode} did not attach within 30 s")


def traced(mode: str, pid: int, progress: Progress, args, tmp: Path) -> Window:  # type: ignore[no-untyped-def]
    out = tmp / f"{mode}.data"
    out.unlink(missing_ok=True)
    if mode == "kvmtrace":
        cmd = kvmtrace_cmd("record", "-p", str(pid), "-o", str(out))
    elif mode == "top":
        cmd = kvmtrace_cmd("top", "-b", "-p", str(pid), "-d", "1")
    elif mode in FLOORS:
        cmd = [sys.executable, __file__, "--floor-child", FLOORS[mode]]
    else:
        cmd = ["perf", "record", "-q", *PERF_EVENTS, "-p", str(pid), "-o", str(out)]
    with open(tmp / f"{mode}.err", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        attached(proc, out, mode, Path(err.name), time.monotonic() + 30)
        time.sleep(args.settle)
        win = measure(progress, mode, args.window)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        if rc not in (0, -signal.SIGINT):  # perf re-raises the SIGINT it handled
            err.seek(0)
            raise SystemExit(f"{mode}: exit {rc}: {err.read()[-400:]}")
    if mode == "kvmtrace":
        rec = open_recording(out)
        win.events = sum(len(b) for b in rec.batches())
        win.lost = rec.lost
        rec.close()
    time.sleep(args.settle)  # its teardown (detaching, writing out) outside the windows
    return win


def untraced(progress: Progress, args) -> Window:  # type: ignore[no-untyped-def]
    time.sleep(args.settle)
    return measure(progress, "none", args.window)


def slowdowns(windows: list[Window], mode: str, key: str) -> list[float]:
    """Each ``mode`` window's ``key`` against the mean of the untraced windows either side
    (for ``none``: each inner untraced window against the mean of the two next to it)."""
    out = []
    nones = [i for i, w in enumerate(windows) if w.mode == "none"]
    for i, w in enumerate(windows):
        if mode == "none":
            if w.mode != "none" or i in (nones[0], nones[-1]):
                continue
            k = nones.index(i)
            left, right = windows[nones[k - 1]], windows[nones[k + 1]]
        else:
            if w.mode != mode:
                continue
            left, right = windows[i - 1], windows[i + 1]
        anchor = (getattr(left, key) + getattr(right, key)) / 2
        out.append(getattr(w, key) / anchor - 1)
    return out


def line(label: str, ratios: list[float], sign: float = 1.0) -> str:
    xs = [sign * r * 100 for r in ratios]
    return (f"{label:<10}" + "".join(f"{x:>+7.1f}%" for x in xs[:8])
            + ("  ..." if len(xs) > 8 else "")
            + f"   median {statistics.median(xs):+.1f}%, spread {min(xs):+.1f} .. {max(xs):+.1f}%")


def floor_child(name: str) -> int:
    """Load tests/bpf/NAME (bcc), say so as kvmtrace does, hold it until SIGINT (sent
    by the benchmark, or by the kernel when the benchmark dies: PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGINT), 0, 0, 0)  # PDEATHSIG
    b = test_program(name)
    print(f"{name} attached. Hit Ctrl-C to end.", file=sys.stderr, flush=True)
    try:
        signal.sigwait({signal.SIGINT})
    finally:
        b.cleanup()
    return 0


def main() -> int:
    ap = parser(__doc__, rounds=6)
    ap.add_argument("--window", type=float, default=3.0, help="seconds per window (3)")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds after a tracer attaches or stops, outside windows (0.5)")
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--tracers", default="kvmtrace,perf",
                    help="comma-separated, in turn: kvmtrace (record), perf, top, empty, clock, "
                         "emit")
    ap.add_argument("--floor-child", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor_child:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        return floor_child(args.floor_child)
    if args.rounds < 2:  # else no untraced window has two untraced neighbours
        ap.error("--rounds: at least 2 (the noise floor compares the untraced windows "
                 "between the first and the last with their neighbours)")
    require_root("bench_slowdown", "BPF and perf tracepoints")
    tracers = args.tracers.split(",")
    if not tracers or set(tracers) - set(TRACERS):
        ap.error(f"--tracers: a comma-separated list of {', '.join(TRACERS)}")
    if "perf" in tracers and not shutil.which("perf"):
        ap.error("--tracers perf: perf is not installed (apt-get install linux-tools-common)")
    order = [t for _ in range(args.rounds) for t in tracers]
    progress = Progress()  # the workload runs until the windows are done (SIGINT)
    cmd = reaper_workload(MAX_RUN_S, vcpus=args.vcpus) + ["--progress-ms", str(PROGRESS_MS)]
    with tempfile.TemporaryDirectory() as tmp:
        vmm = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        reader = threading.Thread(target=progress.read, args=(vmm.stderr,), daemon=True)
        reader.start()
        try:
            progress.at(time.monotonic_ns() + 10**9)  # the guest runs
            windows = [untraced(progress, args)]
            for mode in order:
                windows.append(traced(mode, vmm.pid, progress, args, Path(tmp)))
                windows.append(untraced(progress, args))
        finally:
            vmm.send_signal(signal.SIGINT)
            out, _ = vmm.communicate(timeout=120)
    truth = json.loads(out)
    print(f"one workload ({args.vcpus} vCPUs, tight loop, reaper every 10 ms, 1 MiB rings; "
          f"{truth['wall_ns'] / 1e9:.0f} s); {args.rounds} rounds of {args.window:g} s windows, "
          "each traced window against the mean of the untraced windows either side")
    print("slowdown by rate (guest writes/s/vCPU; + = slower):")
    for mode in ["none", *tracers]:
        print(line(mode, slowdowns(windows, mode, "rate"), -1.0))
    print("vCPU CPU time per guest write (+ = more per write):")
    for mode in ["none", *tracers]:
        print(line(mode, slowdowns(windows, mode, "cpu_per_write")))
    nones = [w.rate for w in windows if w.mode == "none"]
    print(f"untraced rate: {statistics.median(nones):,.0f} writes/s/vCPU (median), "
          f"{min(nones):,.0f} .. {max(nones):,.0f}")
    k = [w for w in windows if w.mode == "kvmtrace"]
    if k:
        print(f"kvmtrace: {sum(w.events or 0 for w in k)} events recorded, "
              f"{sum(w.lost or 0 for w in k)} lost, over {len(k)} windows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
