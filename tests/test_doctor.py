"""`kvmtrace doctor` tells the truth about this host, and about hosts that lack things
(simulated for real: tracefs unmounted in a private mount namespace, a non-root user)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy
from conftest import ROOT, kvmtrace_cmd, require

from kvmtrace.host.doctor import ready, run_checks


def _doctor(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *kvmtrace_cmd("doctor", *args)], capture_output=True,
                          text=True, timeout=60)


def test_doctor_ready_on_this_host(kvm, bpf_root):
    checks = run_checks()
    missing = [c.name for c in checks if c.required and not c.ok]
    assert missing == []
    assert ready(checks)
    proc = _doctor()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(len(line) <= 80 for line in proc.stdout.splitlines())
    assert proc.stdout.splitlines()[-1] == "ready"


def test_doctor_json_names_every_tracepoint(kvm, bpf_root):
    proc = _doctor("--json")
    doc = json.loads(proc.stdout)
    assert doc["schema"] == 1 and doc["ready"] is True
    names = {c["name"] for c in doc["checks"]}
    for event in ("kvm_dirty_ring_push", "kvm_dirty_ring_reset", "kvm_dirty_ring_exit",
                  "kvm_userspace_exit"):
        assert f"kvm:{event}" in names
    ring = next(c for c in doc["checks"] if c["name"] == "dirty ring")
    assert "1048576 bytes" in ring["detail"]  # KVM_CHECK_EXTENSION(192) on this kernel


def test_doctor_without_tracefs_prints_mount_fix(bpf_root):
    unshare = shutil.which("unshare")
    require(unshare is not None, "util-linux unshare missing")
    script = "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug 2>/dev/null; " \
             'exec "$@"'
    proc = _doctor(prefix=(unshare, "--mount", "--propagation", "private", "sh", "-c", script,
                           "sh"))
    assert proc.returncode == 2
    assert "MISSING tracefs" in proc.stdout
    assert "fix: mount -t tracefs nodev /sys/kernel/tracing" in proc.stdout


def test_doctor_not_root(kvm):
    drop: list[str] = []  # already not root: run doctor as we are
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        require(setpriv is not None, "util-linux setpriv missing")
        drop = [str(setpriv), "--reuid=65534", "--regid=65534", "--clear-groups"]
    # the checkout (and its .venv) may sit below a directory only root can enter (/root,
    # mktemp -d): run a world-readable copy of the package (and numpy) with the system Python, which
    # has bcc the same way the venv has it (Debian's python3-bpfcc)
    copy = Path(tempfile.mkdtemp(prefix="kvmtrace-nobody-"))
    try:
        shutil.copytree(ROOT / "kvmtrace", copy / "kvmtrace",
                        ignore=shutil.ignore_patterns("__pycache__"))
        site = Path(numpy.__file__).parents[1]  # the venv's numpy (and its bundled libs)
        for name in ("numpy", "numpy.libs"):
            if (site / name).is_dir():
                shutil.copytree(site / name, copy / name)
        for d, _, files in os.walk(copy):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        proc = subprocess.run(
            [*drop, "/usr/bin/python3", "-m", "kvmtrace", "doctor"],
            capture_output=True, text=True, timeout=60,
            cwd="/", env={**os.environ, "PYTHONPATH": str(copy)})
    finally:
        shutil.rmtree(copy)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    root_line = next(line for line in proc.stdout.splitlines() if " root " in f" {line} ")
    assert root_line.startswith("MISSING")
    if os.geteuid() == 0 or not os.access("/sys/kernel/tracing", os.R_OK):
        # the one thing wrong is said once: not root. tracefs is mounted (the kernel's own
        # /proc/self/mounts says so), only root may look: no mount is suggested
        missing = [line.split()[1] for line in proc.stdout.splitlines()
                   if line.startswith("MISSING")]
        assert missing == ["root"], proc.stdout
        assert "mount -t tracefs" not in proc.stdout
        mounts = Path("/proc/self/mounts").read_text().split("\n")
        mount = next(line.split()[1] for line in mounts if line.split()[2:3] == ["tracefs"])
        assert f"ok      tracefs                     {mount} (mounted; root only)" in \
            proc.stdout.splitlines()
