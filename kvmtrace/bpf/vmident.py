"""VM identity: which process a VM lives in, what it is called, and VMs coming and going.

A VM is (VMM pid, vm = fd | gen << 20): the VMM's file descriptor of the VM and its
generation under that fd (kvmtrace.core.kvm_abi.vm_id()). Where the kernel has BTF the
probes name every VM by its ``struct kvm *`` and so know the fd of VMs created before
tracing too (bpf/probes/dirty_ring.bpf.c, KT_VM_PTR); without it they learn the fd from the
VMM's ioctls seen while tracing, report vm = -1 for pushes and exits of older VMs, and
:func:`resolve_vm` takes the process's only ``anon_inode:kvm-vm`` fd when there is exactly
one (gen 0). Names and VMM kinds come from the command line (kvmtrace.host.vmnames: QEMU's
``-name``, libvirt's domain, Firecracker's ``--id``, cloud-hypervisor's ``--api-socket``
file name, the built-in VMM's ``--name``). :class:`ProcWatcher` reports process exec/exit
through the kernel's process connector (pyroute2.ProcEventSocket) so a live view can
notice VMMs without polling /proc; it is optional and stays out of the map-reading path.
"""

from __future__ import annotations

import os
import select
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.counters import VmInfo, VmName
from ..host.child import descendants
from ..host.vmnames import cmdline, comm, resolve, vm_name

__all__ = [
    "KVM_VM_LINK",
    "vm_fds",
    "resolve_vm",
    "cmdline",
    "comm",
    "vm_name",
    "VmIdentity",
    "ProcEvent",
    "ProcWatcher",
    "VmmsBelow",
]

KVM_VM_LINK = "anon_inode:kvm-vm"
PROC = Path("/proc")


def vm_fds(pid: int) -> list[int]:
    """File descriptors of ``pid`` that are KVM VMs (empty if the process is gone)."""
    fds = []
    try:
        entries = os.listdir(PROC / str(pid) / "fd")
    except OSError:
        return []
    for name in entries:
        try:
            if os.readlink(PROC / str(pid) / "fd" / name) == KVM_VM_LINK:
                fds.append(int(name))
        except OSError:
            continue
    return sorted(fds)


def resolve_vm(pid: int) -> int:
    """The VM fd of a process with exactly one VM, else -1."""
    fds = vm_fds(pid)
    return fds[0] if len(fds) == 1 else -1


class VmIdentity:
    """Caches per process what /proc says (comm, name, VMM kind); ``forget`` when it exits."""

    def __init__(self) -> None:
        self._cache: dict[int, VmName] = {}

    def info(self, pid: int, vm: int, ring_bytes: int | None = None) -> VmInfo:
        if pid not in self._cache:
            self._cache[pid] = resolve(pid)
        who = self._cache[pid]
        return VmInfo(pid=pid, vm=vm, comm=who.comm, name=who.name, vmm=who.vmm,
                      ring_bytes=ring_bytes)

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)


@dataclass(frozen=True)
class ProcEvent:
    kind: str  # "exec", "exit" (a whole process) or "thread_exit" (one of its threads)
    pid: int  # tgid
    tid: int


class ProcWatcher:
    """Process exec/exit notifications from the kernel's process connector (root only).

    ``poll(timeout)`` returns what arrived, waiting at most ``timeout`` seconds; a thread
    that is not its process's main thread (pid != tid) exiting is a ``thread_exit``.
    """

    def __init__(self) -> None:
        from pyroute2 import ProcEventSocket

        self._sock = ProcEventSocket()
        self._sock.bind()
        self._sock.control(True)

    def fileno(self) -> int:
        return self._sock.fileno()

    def poll(self, timeout: float = 0.0) -> list[ProcEvent]:
        out: list[ProcEvent] = []
        wait = timeout
        while select.select([self._sock], [], [], wait)[0]:
            wait = 0.0
            data = self._sock.recv(65536)
            for msg in self._sock.marshal.parse(data):
                event = msg.get("event")
                if event not in ("PROC_EVENT_EXEC", "PROC_EVENT_EXIT"):
                    continue
                pid, tid = int(msg["process_tgid"]), int(msg["process_pid"])
                kind = "exec" if event == "PROC_EVENT_EXEC" else "exit"
                if kind == "exit" and pid != tid:
                    kind = "thread_exit"
                out.append(ProcEvent(kind, pid, tid))
        return out

    def close(self) -> None:
        # Closing unsubscribes; control(False) would wait for a reply that never comes.
        self._sock.close()


class VmmsBelow:
    """Descendants of ``-- COMMAND`` that hold a KVM VM (a wrapper script that starts the
    VMM as its child), where the probes cannot follow COMMAND's process tree (a kernel
    without the sched tracepoints: Probes(follow=True) falls back to COMMAND's own pid),
    so their events are not traced; :meth:`warning` says so and names the VMM's pid.
    Looked up at most every ``every_s`` seconds (:meth:`watch`) while COMMAND runs."""

    def __init__(self, pid: int, every_s: float = 0.25) -> None:
        self.pid, self.every_s, self.next = pid, every_s, 0.0
        self.found: dict[int, str] = {}

    def watch(self) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.every_s
        for pid in descendants(self.pid):
            if pid not in self.found and vm_fds(pid):
                self.found[pid] = resolve(pid).comm or "?"

    def warning(self, tool: str, what: str) -> str | None:
        """``kvmtrace TOOL: warning: WHAT from PID, but its child ...``, or None when no
        descendant created a VM."""
        if not self.found:
            return None
        vmms = ", ".join(f"{pid} ({comm})" for pid, comm in sorted(self.found.items()))
        return (f"kvmtrace {tool}: warning: {what} from {self.pid}, but its child {vmms} "
                f"created a VM: trace the VMM itself (-- VMM-COMMAND, or -p "
                f"{min(self.found)} while it runs)")
