"""Helpers of the VM identity tests (tests/test_identity_kvm.py, tools/soak_identity.py):
VMMs driven by kvmtrace.vmm in a child process, stopped once their VMs exist so that the
probes load after the VMs were created, and ground truth keyed like the probes' rings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from conftest import kvm_fds

from kvmtrace.core.events import Kind
from kvmtrace.core.kvm_abi import vm_id

__all__ = ["ROOT", "VMS_CMD", "vmm", "kvm_links", "stop_when", "rings_of", "finish",
           "first_dirty_index", "gens_of"]

ROOT = Path(__file__).resolve().parents[1]

#: argv of a VMM child running groups of VMs (kvmtrace.testing.vm_cycles): groups one
#: after the other (so VM fds are reused), the VMs of a group at once in threads (several
#: VMs in one process); it waits for a byte on stdin (EOF will do), then prints the ground
#: truths of every VM in (group, VM) order
VMS_CMD = [sys.executable, "-m", "kvmtrace.testing.vm_cycles"]


def vmm(groups: list[list[dict[str, Any]]], gate: bool = False,
        fds_before: int = 0) -> subprocess.Popen[bytes]:
    """A child running ``groups`` (:data:`VMS_CMD`; stdout: the truths); ``gate``: held
    until fed a byte; ``fds_before``: files it opens first (/dev/null), so that its VM fds
    come after them."""
    cmd = VMS_CMD
    if fds_before:
        cmd = [sys.executable, "-c",
               f"import os, sys\nfor _ in range({fds_before}): os.open(os.devnull, os.O_RDONLY)\n"
               "from kvmtrace.testing.vm_cycles import main\nsys.exit(main(sys.argv[1:]))"]
    return subprocess.Popen([*cmd, json.dumps(groups)], cwd=ROOT,
                            stdin=subprocess.PIPE if gate else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})


def kvm_links(pid: int) -> Counter[str]:
    """How many fds of each KVM kind (``kvm-vm``, ``kvm-vcpu``) the process holds."""
    return Counter(name.split(":")[0] for name in kvm_fds(pid).values())


def stop_when(child: subprocess.Popen[bytes], vms: int, vcpus: int, timeout: float = 30) -> None:
    """SIGSTOP the child once it holds ``vms`` VM fds and ``vcpus`` vCPUs, each with its
    fd and the dup Python's mmap keeps of it for each of its two mappings (kvm_run and the
    ring): probes loaded now see VMs created before them."""
    deadline = time.monotonic() + timeout
    while True:
        links = kvm_links(child.pid)
        if links["kvm-vm"] >= vms and links["kvm-vcpu"] >= 3 * vcpus:
            break
        if child.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"VMM ended or stalled before its VMs existed: {links}")
        time.sleep(0.0005)
    os.kill(child.pid, signal.SIGSTOP)
    assert child.poll() is None, "VMM ended before it could be stopped"


def finish(child: subprocess.Popen[bytes]) -> list[dict[str, Any]]:
    """Continue a stopped child; its truths once it exits."""
    os.kill(child.pid, signal.SIGCONT)
    assert child.stdout is not None
    out = child.stdout.read()
    assert child.wait() == 0, out
    return json.loads(out)


def gens_of(truths: list[dict[str, Any]]) -> list[int]:
    """The gen each VM should get with the tracer there before the first: how many VMs
    before it (in creation order) had the same fd."""
    seen: Counter[int] = Counter()
    gens = []
    for t in truths:
        gens.append(seen[t["vm_fd"]])
        seen[t["vm_fd"]] += 1
    return gens


def rings_of(truths: list[dict[str, Any]], gens: list[int] | None = None
             ) -> dict[tuple[int, int, int], dict[str, Any]]:
    """(pid, vm, ring index) -> the ring's ground truth (with ``ring_entries``, ``resets``
    of its VM added), vm packed with the VM's gen (default :func:`gens_of`)."""
    gens = gens_of(truths) if gens is None else gens
    out = {}
    for t, gen in zip(truths, gens, strict=True):
        for r in t["rings"]:
            out[(t["pid"], vm_id(t["vm_fd"], gen), r["index"])] = {
                **r, "ring_entries": t["ring_entries"], "resets": t["resets"]}
    return out


def first_dirty_index(ev: np.ndarray, kind: Kind = Kind.PUSH) -> dict[tuple[int, int, int], int]:
    """(pid, vm, ring) -> dirty_index of its first push (or event of ``kind``) in ``ev``."""
    out: dict[tuple[int, int, int], int] = {}
    for e in ev[ev["kind"] == kind]:
        out.setdefault((int(e["pid"]), int(e["vm"]), int(e["ring"])), int(e["dirty_index"]))
    return out
