"""The VM name resolver (kvmtrace.host.vmnames) over real ``/proc/PID/cmdline`` text.

Each case starts a real process whose argv carries a VMM's flags and asks the resolver
about its pid: the kernel's own cmdline and comm files, no mock. The processes are Python
with argv[0] renamed (``subprocess.Popen(executable=...)``) and a ``-c CODE`` pair after it
(what keeps the interpreter from parsing the VMM's flags); the kernel sets ``comm`` from the
file executed, so it is the interpreter's name whatever argv[0] says. A real QEMU (when
installed) and the built-in VMM (``kvmtrace workload --name``) are checked as they run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import have_kvm_ring, kvmtrace_cmd, require

from kvmtrace.core.counters import VmName
from kvmtrace.host.vmnames import cmdline, comm, parse_argv, resolve

_SLEEP = "import sys,time; sys.stdout.write('up\\n'); sys.stdout.flush(); time.sleep(60)"
LIBVIRT_SECRET = ('{"qom-type":"secret","id":"masterKey0","format":"raw",'
                  '"file":"/var/lib/libvirt/qemu/domain-3-dom1/master-key.aes"}')

CASES = [
    # (argv[0], args after -c CODE, VMM kind, name)
    ("qemu-system-x86_64", ["-name", "guest=web01", "-display", "none", "-S"], "qemu", "web01"),
    ("/usr/bin/qemu-system-x86_64", ["-accel", "kvm", "-name", "guest=web02,debug-threads=on"],
     "qemu", "web02"),
    ("/usr/bin/qemu-system-x86_64", ["-name", "guest=dom1,debug-threads=on", "-S", "-object",
                                     LIBVIRT_SECRET, "-machine", "pc-q35-7.2"], "libvirt", "dom1"),
    ("qemu-kvm", ["-m", "1G", "-name", "db2"], "qemu", "db2"),
    ("qemu-kvm", ["-name", "a,,b,process=qemu:x"], "qemu", "a,b"),
    ("qemu-system-x86_64", ["-name=solo"], "qemu", "solo"),
    ("qemu-system-x86_64", ["-m", "64"], "qemu", None),
    ("/usr/bin/firecracker", ["--api-sock", "/tmp/fc.sock", "--id", "fc-42"], "firecracker",
     "fc-42"),
    ("firecracker", ["--id=fc-7", "--no-api"], "firecracker", "fc-7"),
    ("cloud-hypervisor", ["--api-socket", "path=/run/libvirt/ch/vm7-socket", "--cpus",
                          "boot=2"], "cloud-hypervisor", "vm7"),
    ("/usr/local/bin/cloud-hypervisor", ["--api-socket", "/tmp/box.sock"], "cloud-hypervisor",
     "box"),
    ("cloud-hypervisor", ["--api-socket", "fd=3"], "cloud-hypervisor", None),
    ("python3", ["-m", "kvmtrace", "workload", "--name", "bench-3", "--vcpus", "2"],
     "kvmtrace", "bench-3"),
    ("/usr/bin/python3", ["-m", "kvmtrace", "workload", "--name=x"], "kvmtrace", "x"),
    ("python3", ["-m", "kvmtrace", "workload"], "kvmtrace", None),
    ("python3", ["-m", "http.server"], None, None),
]


def _spawn(argv0: str, args: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([argv0, "-c", _SLEEP, *args], executable=sys.executable,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    return proc


@pytest.mark.parametrize(("argv0", "args", "vmm", "name"), CASES,
                         ids=[f"{c[2]}-{c[3]}" for c in CASES])
def test_resolver_reads_a_live_process(argv0: str, args: list[str], vmm: str | None,
                                       name: str | None) -> None:
    proc = _spawn(argv0, args)
    try:
        assert cmdline(proc.pid) == [argv0, "-c", _SLEEP, *args]  # the kernel's own text
        # comm: the kernel names the task after the file executed, at most 15 bytes
        expect_comm = os.path.basename(sys.executable)[:15]
        assert resolve(proc.pid) == VmName(vmm=vmm, name=name, comm=expect_comm)
    finally:
        proc.kill()
        proc.wait()


def test_resolver_of_a_process_that_is_gone() -> None:
    for _ in range(20):  # reaped: /proc/PID is gone, unless the pid was reused at once
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        if not Path(f"/proc/{proc.pid}").exists():
            break
    assert not Path(f"/proc/{proc.pid}").exists(), "every pid was reused at once"
    assert resolve(proc.pid) == VmName() and cmdline(proc.pid) == [] and comm(proc.pid) == ""


def test_resolver_of_a_zombie() -> None:
    """Exited, not reaped: the kernel keeps comm but shows an empty cmdline; the resolver
    says nothing rather than "no name"."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while _state(proc.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(proc.pid) == "Z"
        assert cmdline(proc.pid) == [] and comm(proc.pid) == os.path.basename(sys.executable)[:15]
        assert resolve(proc.pid) == VmName()
    finally:
        proc.wait()


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_parse_argv_of_other_forms() -> None:
    assert parse_argv([]) == (None, None)
    # the console script; the recorder running it is no VMM ("record" follows "kvmtrace")
    assert parse_argv(["/usr/local/bin/kvmtrace", "workload", "--name", "b"]) == ("kvmtrace", "b")
    assert parse_argv(["kvmtrace", "record", "-o", "r.kvt", "--", "kvmtrace", "workload",
                       "--name", "b"]) == (None, None)


def test_resolver_on_a_real_qemu() -> None:
    require(shutil.which("qemu-system-x86_64") is not None,
            "QEMU is not installed (tools/setup.sh --test installs it)")
    require(*have_kvm_ring())
    proc = subprocess.Popen(["qemu-system-x86_64", "-name", "guest=web01,debug-threads=on",
                             "-display", "none", "-S", "-accel", "kvm", "-nodefaults",
                             "-serial", "none", "-monitor", "none"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not _has_vm(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert _has_vm(proc.pid), "QEMU created no VM"
        got = resolve(proc.pid)
        # comm: QEMU's own file name as the kernel truncates it (15 bytes)
        assert got == VmName(vmm="qemu", name="web01", comm="qemu-system-x86")
    finally:
        proc.kill()
        proc.wait()


def _has_vm(pid: int) -> bool:
    from conftest import kvm_fds

    return "kvm-vm" in kvm_fds(pid).values()


def test_resolver_on_the_builtin_vmm(tmp_path: Path) -> None:
    require(*have_kvm_ring())
    pid_file = tmp_path / "pid"
    proc = subprocess.Popen(kvmtrace_cmd("workload", "--name", "web01", "--duration", "3",
                                         "--json", "--pid-file", str(pid_file)),
                            stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not _has_vm(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        got = resolve(proc.pid)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    truth = json.loads(out)
    assert truth["name"] == "web01" and truth["pid"] == proc.pid  # the VMM's own report
    assert got == VmName(vmm="kvmtrace", name=truth["name"],
                         comm=os.path.basename(sys.executable)[:15])
