#!/usr/bin/env python3
"""Start-up of the live commands: time from exec to probes attached, and peak RSS, of
``kvmtrace top -b`` and ``kvmtrace record`` compiling the probes (cold: KVMTRACE_NO_CACHE=1,
what every start did before the probe cache) and loading them from the cache (warm), against
``perf record`` on the four kvm dirty-ring tracepoints, measured in turns in one run.

"Attached" is read from outside, the same way for every tracer: the bench polls
/proc/PID/fd (every ~2 ms) and counts the attachments the process holds (``bpf_link`` fds
of raw tracepoints and ``[perf_event]`` fds: tracepoints, and perf's own events). Once that
count has not changed for ``--settle`` seconds, the time of its last increase since exec is
the time to attached (and the process's CPU then: user + system, in clock ticks); the
peak RSS is the process's VmHWM at the end (before it is stopped). Each
round runs every tracer once, in turn; each figure is printed as the median of the rounds
with min-max, and as a ratio to perf's start in the same round (median of the per-round
ratios). The machine is shared: say its load with the figures (printed at the start).
kvmtrace runs with ``-p`` the bench's own pid (the probes then count nothing), perf with
``-a``; the cache lives in a temporary folder filled by one untimed start.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import Column, Table, kvmtrace_cmd, parser, require_root

_ATTACH = ("anon_inode:bpf_link", "anon_inode:[perf_event]")
_EVENTS = ("kvm_dirty_ring_push", "kvm_dirty_ring_reset", "kvm_dirty_ring_exit",
           "kvm_userspace_exit")


@dataclass
class Start:
    attached_s: float  # exec to the last attachment
    peak_kb: int  # VmHWM
    attachments: int
    cpu_s: float  # user + system of the process when its last attachment was seen


def _attachments(pid: int) -> int:
    n = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return -1
    for fd in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(_ATTACH):
                n += 1
        except OSError:
            continue
    return n


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(argv: list[str], env: dict[str, str], settle: float, limit: float) -> Start:
    """Run ``argv``; time to its last attachment; stop it with SIGINT once settled."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    count, last_change, attached, cpu = 0, t0, t0, 0.0
    try:
        while True:
            now = time.monotonic()
            n = _attachments(proc.pid)
            if n < 0 or proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise SystemExit(f"{argv[0]} ended early: {err.strip()[-400:]}")
            if n != count:
                if n > count:
                    attached, cpu = now, _cpu(proc.pid)
                count, last_change = n, now
            if count and now - last_change >= settle:
                break
            if now - t0 > limit:
                raise SystemExit(f"{' '.join(argv)}: not attached within {limit} s")
            time.sleep(0.002)
        return Start(attached - t0, _status_kb(proc.pid, "VmHWM"), count, cpu)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()


def main() -> int:
    ap = parser(__doc__, rounds=5)
    ap.add_argument("--settle", type=float, default=1.5,
                    help="seconds without a new attachment that end a start (1.5)")
    args = ap.parse_args()
    require_root("bench_start", "it loads BPF probes and runs perf")
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} on "
          f"{os.cpu_count()} CPUs at start", flush=True)
    me = str(os.getpid())
    with tempfile.TemporaryDirectory(prefix="kvmtrace-bench-start-") as tmp:
        cache = Path(tmp, "cache")
        base = dict(os.environ, KVMTRACE_CACHE_DIR=str(cache))
        base.pop("KVMTRACE_NO_CACHE", None)
        cold = dict(base, KVMTRACE_NO_CACHE="1")
        top = kvmtrace_cmd("top", "-b", "-d", "1", "-p", me)
        rec = kvmtrace_cmd("record", "-p", me, "-o", str(Path(tmp, "bench.kvt")))
        perf = ["perf", "record", "-a", "-q", "-o", str(Path(tmp, "perf.data")),
                *(a for e in _EVENTS for a in ("-e", f"kvm:{e}"))]
        tracers = {"perf record": (perf, base), "top cold": (top, cold),
                   "top warm": (top, base), "record cold": (rec, cold),
                   "record warm": (rec, base)}
        for argv in (top, rec):  # fill the cache, untimed
            measure(argv, base, args.settle, 120)
        got: dict[str, list[Start]] = {name: [] for name in tracers}
        table = Table([Column("round", ">5"), Column("tracer", "<12"), Column("attached s", ">10"),
                       Column("x perf", ">7"), Column("peak MB", ">8"), Column("cpu s", ">6"),
                       Column("fds", ">4")])
        print(table.header(), flush=True)
        for r in range(args.rounds):
            for name, (argv, env) in tracers.items():
                s = measure(argv, env, args.settle, 120)
                got[name].append(s)
                ratio = s.attached_s / got["perf record"][r].attached_s
                print(table.row(r + 1, name, f"{s.attached_s:.3f}", f"{ratio:.2f}",
                                f"{s.peak_kb / 1024:.0f}", f"{s.cpu_s:.2f}", s.attachments),
                      flush=True)
    print(f"\nmedian (min-max) over {args.rounds} rounds; x perf: median of the per-round "
          "ratios to perf record's start")
    for name, starts in got.items():
        t = [s.attached_s for s in starts]
        mb = [s.peak_kb / 1024 for s in starts]
        ratios = [s.attached_s / p.attached_s for s, p in zip(starts, got["perf record"],
                                                              strict=True)]
        print(f"{name:<12} attached {statistics.median(t):.3f} s ({min(t):.3f}-{max(t):.3f})"
              f"  x perf {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
              f"  peak {statistics.median(mb):.0f} MB ({min(mb):.0f}-{max(mb):.0f})"
              f"  cpu {statistics.median(s.cpu_s for s in starts):.2f} s")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
