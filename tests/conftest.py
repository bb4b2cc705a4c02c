"""Shared fixtures. ``require(feature_ok, reason)`` skips a test when the host lacks a
kernel feature or a tool the test drives (the only way tests skip), and fails it instead
when KVMTRACE_REQUIRE_KERNEL=1 (as in .ci/run)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
# real kernel text of dirty-ring runs (the kernel's own output, kept as fixtures)
SAMPLES = ROOT / "tests" / "data" / "samples"
REQUIRE_KERNEL = os.environ.get("KVMTRACE_REQUIRE_KERNEL") == "1"

# The session's own probe cache (kvmtrace.bpf.objcache), made here (mode 0700) so that no
# command's stderr carries the notice of its first write, and the suite neither reads nor
# fills the host's /var/cache/kvmtrace. Commands run by tests inherit it.
if "KVMTRACE_CACHE_DIR" not in os.environ:
    _PROBE_CACHE = tempfile.mkdtemp(prefix="kvmtrace-test-probe-cache-")
    os.environ["KVMTRACE_CACHE_DIR"] = _PROBE_CACHE
    atexit.register(shutil.rmtree, _PROBE_CACHE, True)


def require(ok: bool, reason: str) -> None:
    """Skip (or, under KVMTRACE_REQUIRE_KERNEL=1, fail) unless ``ok``."""
    if ok:
        return
    if REQUIRE_KERNEL:
        pytest.fail(f"KVMTRACE_REQUIRE_KERNEL=1 but {reason}")
    pytest.skip(reason)


def have_kvm_ring() -> tuple[bool, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "no usable /dev/kvm"
    return True, ""


@pytest.fixture
def kvm() -> None:
    """A test that runs a real guest with the dirty ring."""
    ok, why = have_kvm_ring()
    require(ok, why)


@pytest.fixture
def bpf_root() -> None:
    """A test that loads BPF probes: root, tracefs, bcc."""
    require_bpf()


@pytest.fixture
def samples() -> Path:
    assert SAMPLES.is_dir(), f"samples missing at {SAMPLES}"
    return SAMPLES


def kvmtrace_cmd(*args: str) -> list[str]:
    """argv that runs this checkout's kvmtrace with the test's interpreter."""
    return [sys.executable, "-m", "kvmtrace", *args]


def require_kvm_bpf() -> None:
    """The checks of the ``kvm`` and ``bpf_root`` fixtures, callable from module-scoped
    fixtures (which cannot use function-scoped ones)."""
    ok, why = have_kvm_ring()
    require(ok, why)
    require_bpf()


def require_bpf() -> None:
    """Root, tracefs and bcc: what loading the probes needs."""
    require(os.geteuid() == 0, "not root: BPF needs root")
    require(Path("/sys/kernel/tracing/events/kvm").is_dir(), "tracefs not mounted")
    try:
        import bcc  # noqa: F401
    except ImportError:
        require(False, "bcc (python3-bpfcc) does not import")


@dataclass
class RecordedRun:
    """One ``kvmtrace record -o path -- kvmtrace workload --json --dump-harvest ...``."""

    truth: dict[str, Any]  # the workload's --json object
    dump: dict[str, Any]  # the workload's --dump-harvest file
    path: Path  # the recording


def record_workload(out_dir: Path, *workload: str, timeout: float = 120) -> RecordedRun:
    """Record a ``kvmtrace workload`` run (args ``workload``) into ``out_dir/run.kvt``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out, truth, dump = out_dir / "run.kvt", out_dir / "truth.json", out_dir / "harvest.json"
    cmd = kvmtrace_cmd("record", "-o", str(out), "--",
                       *kvmtrace_cmd("workload", "--json", "--dump-harvest", str(dump),
                                     *workload))
    with truth.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True,
                              timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return RecordedRun(json.loads(truth.read_text()), json.loads(dump.read_text()), out)


def kvm_fds(pid: int) -> dict[int, str]:
    """fd -> anon inode name (``kvm-vm``, ``kvm-vcpu:0``, ...) of process ``pid``'s KVM
    fds, read from /proc (empty once the process is gone)."""
    out: dict[int, str] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("anon_inode:kvm-"):
            out[int(name)] = target.removeprefix("anon_inode:")
    return out
