"""Capture the kernel's own text of the dirty-ring tracepoints for one command: tracefs
(a private instance filtered on the command's pid and its threads) or ``perf record``
then ``perf script``. Both return (trace text path, the command's stdout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("kvm_dirty_ring_push", "kvm_dirty_ring_reset", "kvm_dirty_ring_exit",
          "kvm_userspace_exit")
HERE = Path(__file__).resolve().parent


def multivm_cmd(vms: int, *flags: str, wait: bool = False) -> list[str]:
    """argv of tests/multivm.py: ``vms`` built-in VMs in one process."""
    return [sys.executable, str(HERE / "multivm.py"), str(vms),
            *(["--wait"] if wait else []), *flags]


def tracefs_capture(out: Path, cmd: list[str], *, tgid: bool = False,
                    timeout: float = 120) -> tuple[Path, str]:
    """Run ``cmd`` (which reads one line from stdin before it starts, as multivm.py
    --wait) with the four events enabled in a tracefs instance of its own; write the
    instance's ``trace`` to ``out``. ``tgid``: options/record-tgid (the pid column)."""
    inst = TRACEFS / "instances" / f"kvmtrace-test-{os.getpid()}-{out.stem}"
    inst.mkdir()
    try:
        (inst / "buffer_size_kb").write_text("32768\n")
        (inst / "options" / "event-fork").write_text("1\n")
        (inst / "options" / "record-tgid").write_text("1\n" if tgid else "0\n")
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        (inst / "set_event_pid").write_text(f"{proc.pid}\n")
        for name in EVENTS:
            (inst / "events" / "kvm" / name / "enable").write_text("1\n")
        (inst / "tracing_on").write_text("1\n")
        stdout, stderr = proc.communicate("go\n", timeout=timeout)
        assert proc.returncode == 0, stderr
        (inst / "tracing_on").write_text("0\n")
        out.write_bytes((inst / "trace").read_bytes())
        return out, stdout
    finally:
        for name in EVENTS:
            (inst / "events" / "kvm" / name / "enable").write_text("0\n")
        inst.rmdir()


def perf_capture(out: Path, cmd: list[str], *, pid_column: bool = False,
                 timeout: float = 120) -> tuple[Path, str]:
    """``perf record -e kvm:kvm_dirty_ring_{push,reset,exit} -- cmd`` then ``perf script``
    (default fields, microseconds; ``pid_column``: -F with pid/tid and --ns)."""
    perf = shutil.which("perf")
    assert perf is not None
    data = out.with_suffix(".data")
    rec = [perf, "record", "-m", "4096", "-o", str(data)]  # 16 MiB per CPU: no loss
    for name in EVENTS[:3]:
        rec += ["-e", f"kvm:{name}"]
    script = [perf, "script", "-i", str(data)]
    if pid_column:
        script += ["--ns", "-F", "comm,pid,tid,cpu,time,event,trace"]
    # perf record here writes a file without samples while another perf session records
    # the same tracepoints system-wide (other tests on a shared host): try again later
    for attempt in range(6):
        if attempt:
            time.sleep(2)
        proc = subprocess.run([*rec, "--", *cmd], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        # perf reports dropped samples only here ("lost N chunks", "LOST n events")
        assert "lost" not in proc.stderr.lower(), proc.stderr
        with out.open("w") as f:
            subprocess.run(script, stdout=f, stderr=subprocess.DEVNULL, check=False,
                           timeout=timeout)
        if out.stat().st_size:
            return out, proc.stdout
    raise AssertionError(f"perf record wrote no samples six times: {proc.stderr}")
