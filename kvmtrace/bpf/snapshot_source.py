"""LiveSource: the running kernel as a SnapshotSource.

Each :meth:`LiveSource.snapshot` reads the probes' in-kernel maps once (cost grows with
the number of rings, not with the event rate), resolves VMs the probes could not identify
(vm = -1: created before tracing started) to the process's only KVM VM fd (remembered
after the process exits, until the watcher reports the exit), and fills each
VM's :class:`~kvmtrace.core.counters.VmInfo` (comm, QEMU ``-name`` and the like).

With ``watch=True`` a :class:`~kvmtrace.bpf.vmident.ProcWatcher` notices VMM processes
exiting; their map entries (rows, VMs, vCPU fds, push slots) are dropped one snapshot
later, so the last snapshot before the drop still holds their final counts; the per-thread
entries of exited threads are dropped at the next snapshot.

A VM that goes away while its process lives on (its fd no longer a KVM VM in the process,
or a newer VM under the same fd: ``vm = fd | gen << 20``) is dropped once two snapshots in
a row showed it gone with the same counts, so maps stay bounded as VMs come and go.

Stuck rings (:mod:`kvmtrace.analysis.stuck`) come with every snapshot: the probes keep a
ring's stuck state and its soft-full exits since its reset index last moved, so a flag
shows in the first snapshot after the event (within two refreshes).
"""

from __future__ import annotations

import os
import time

from ..core.counters import Snapshot, VmInfo
from ..core.kvm_abi import entries_from_bytes, vm_fd, vm_gen
from ..core.sources import SnapshotSource, SourceMeta
from .loader import Probes
from .vmident import ProcWatcher, VmIdentity, resolve_vm, vm_fds

__all__ = ["LiveSource"]


class LiveSource(SnapshotSource):
    """SnapshotSource over :class:`~kvmtrace.bpf.loader.Probes` (loads them unless given)."""

    def __init__(
        self,
        *,
        pid: int = 0,
        hook: str = "auto",
        probes: Probes | None = None,
        watch: bool = False,
    ) -> None:
        self.probes = probes if probes is not None else Probes(pid=pid, hook=hook)
        uname = os.uname()
        self.meta = SourceMeta(
            kind="live",
            kernel_release=uname.release,
            host=uname.nodename,
            start_time=time.time(),
            hooks=dict(self.probes.hooks),
            tracepoint_formats=self.probes.tracepoint_formats(),
            # "light": no push probe (Probes mode top-light)
            extra={"mode": "light" if self.probes.mode == "top-light" else "full"},
        )
        self._ident = VmIdentity()
        self._watcher = ProcWatcher() if watch else None
        self._exited: set[int] = set()
        self._threads_exited: set[int] = set()
        self._gone: dict[tuple[int, int], tuple[int, ...]] = {}  # VM -> its counts, seen gone

        self._vm_of: dict[int, int] = {}  # pid -> resolved VM fd, kept until it exits

    def _resolve(self, pid: int) -> int:
        fd = self._vm_of.get(pid, -1)
        if fd < 0:
            fd = resolve_vm(pid)
            if fd >= 0:
                self._vm_of[pid] = fd
        return fd

    def snapshot(self) -> Snapshot:
        for pid in self._exited:  # exited before the previous snapshot, which kept them
            self.probes.forget(pid)
            self._ident.forget(pid)
            self._vm_of.pop(pid, None)
        self._exited.clear()
        self.probes.forget_threads(self._threads_exited)
        self._threads_exited.clear()
        if self._watcher is not None:
            for e in self._watcher.poll(0.0):
                if e.kind == "exit":
                    self._exited.add(e.pid)
                    self._threads_exited.add(e.pid)  # its main thread
                elif e.kind == "thread_exit":
                    self._threads_exited.add(e.tid)
        snap = self.probes.snapshot(resolve=self._resolve)
        if self._watcher is not None:  # without it, rows stay to the end (top -- COMMAND)
            self._drop_gone_vms(snap)

        vms: dict[tuple[int, int], VmInfo] = {}
        for pid, vm in {(k.pid, k.vm) for k in snap.rings} | set(snap.vms):
            known = snap.vms.get((pid, vm))
            vms[(pid, vm)] = self._ident.info(pid, vm, known.ring_bytes if known else None)
        snap.vms = vms
        for (pid, vm), info in vms.items():  # the VM's KVM_ENABLE_CAP; its rings may say more
            if info.ring_bytes:
                self.meta.ring_entries[(pid, vm)] = entries_from_bytes(info.ring_bytes)
        for key, counters in snap.rings.items():
            if counters.size is not None:
                self.meta.ring_entries[(key.pid, key.vm)] = counters.size
        return snap

    def _drop_gone_vms(self, snap: Snapshot) -> None:
        """Forget VMs of live processes that were gone, with unchanged counts, at this
        snapshot and the previous one (both showed their final counts)."""
        counts: dict[tuple[int, int], tuple[int, ...]] = {}
        for (pid, vm), vc in snap.vm_counters.items():  # a VM that reset rings, maybe no row
            if vc.reset_ioctls and vm >= 0 and pid not in self._exited:
                counts[(pid, vm)] = (0, 0, 0, 0)
        for key, c in snap.rings.items():
            if key.vm >= 0 and key.pid not in self._exited:
                old = counts.get((key.pid, key.vm), (0, 0, 0, 0))
                counts[(key.pid, key.vm)] = (old[0] + c.pushes, old[1] + c.resets,
                                             old[2] + c.soft_full_exits, old[3] + c.dirty_index)
        newest: dict[tuple[int, int], int] = {}
        for pid, vm in counts:
            newest[(pid, vm_fd(vm))] = max(newest.get((pid, vm_fd(vm)), 0), vm_gen(vm))
        open_fds: dict[int, set[int]] = {}
        gone: dict[tuple[int, int], tuple[int, ...]] = {}
        for (pid, vm), sums in counts.items():
            if pid not in open_fds:
                open_fds[pid] = set(vm_fds(pid))
            if not open_fds[pid] and not os.path.isdir(f"/proc/{pid}"):
                continue  # the process is gone: the exit path forgets it whole
            if vm_fd(vm) not in open_fds[pid] or vm_gen(vm) < newest[(pid, vm_fd(vm))]:
                gone[(pid, vm)] = sums
        for (pid, vm), sums in gone.items():
            if self._gone.get((pid, vm)) == sums:
                self.probes.forget_vm(pid, vm)
        self._gone = gone

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        self.probes.close()

    def __enter__(self) -> LiveSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
