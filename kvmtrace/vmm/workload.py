"""Run the built-in guest in N VMs of M vCPU threads each and harvest like a VMM.

Harvest modes: ``on-full``: a vCPU harvests its own ring and resets on exit 31;
``reaper``: a reaper thread per VM harvests every ring every ``reaper_ms`` and vCPUs also
harvest on exit 31; ``lazy``: on exit 31 a vCPU only waits for the reaper's next cycle.
Every harvest+reset of a VM is serialized by the VM's lock (KVM_RESET_DIRTY_RINGS acts on
all its rings). At the end of a cycle, one final harvest of every ring and one reset per VM
account for every entry. A vCPU that gets exit 31 LIVELOCK_EXITS times in a row with
nothing harvested from its ring in between (by anyone) is a livelock (the ring overflowed
and got stuck): that VM's vCPUs are stopped and the livelock reported.

``trace`` (a :class:`~.traced.TracePlan`, ``--replay``) runs the trace-driven guest
instead: one vCPU per ring of the trace, each writing that ring's pushes; on a marked write
(an I/O exit to MARK_PORT) the vCPU harvests its ring and resets, whatever the harvest mode.

``vm_cycles`` > 1 closes every VM (vCPU fds, mmaps, VM fd) after a cycle and creates them
again, so the kernel hands out the same fd numbers again.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..core.kvm_abi import KVM_DIRTY_GFN_F_DIRTY, entries_from_bytes, soft_limit_of
from ..errors import KvmtraceError, UsageError
from ..host import kvm as k
from ..host.kvm import open_kvm
from .guest import MARK_PORT, PATTERNS, GuestCode, GuestLayout, assemble
from .harvest import Harvester, RingState
from .heartbeat import Heartbeat
from .helpers import Migrator, ResetInterrupter, usable_cpus
from .traced import TraceLayout, TracePlan
from .truth import RingTruth, WorkloadResult
from .vm import Vm, check_ring_bytes, describe_oserror

__all__ = ["HARVEST_MODES", "LIVELOCK_EXITS", "STOP_SIGNAL", "MAX_VMS", "MAX_VM_CYCLES",
           "WorkloadConfig", "run_workload"]

HARVEST_MODES = ("on-full", "reaper", "lazy")
LIVELOCK_EXITS = 3
STOP_SIGNAL = signal.SIGUSR1  # kicks a thread out of KVM_RUN / KVM_RESET_DIRTY_RINGS
MAX_VMS = 16
MAX_VM_CYCLES = 1000


@dataclass
class WorkloadConfig:
    """Shape of a run. ``passes`` is ignored when ``duration_s`` is set (run until then;
    per cycle with ``vm_cycles``). ``keep_harvest`` keeps every harvested (slot, offset)
    for ``harvest_dump()``. ``migrate_ms``: re-pin each vCPU thread to another CPU every
    that many ms (None: never). ``interrupt_resets``: signal the thread inside
    KVM_RESET_DIRTY_RINGS so calls get cut short."""

    vcpus: int = 1
    ring_bytes: int = 4096
    pages: int = 1000
    passes: int = 1
    duration_s: float | None = None
    pattern: str = "seq"
    seed: int = 0
    exit_every: int = 1
    harvest: str = "on-full"
    reaper_ms: float = 10.0
    harvest_delay_us: float = 0.0
    start_delay_ms: float = 0.0
    keep_harvest: bool = False
    vms: int = 1
    vm_cycles: int = 1
    migrate_ms: float | None = None
    interrupt_resets: bool = False
    name: str | None = None  # the VM's name (--name), as QEMU's -name guest=; in the result
    progress_ms: float | None = None  # a progress line on stderr every so many ms (heartbeat.py)
    trace: TracePlan | None = None  # --replay: vcpus, pages and pattern come from the trace

    def validate(self) -> GuestLayout | TraceLayout:
        """Check everything that does not need the kernel; returns the guest layout."""
        check_ring_bytes(self.ring_bytes)
        if not 1 <= self.vcpus <= 64:
            raise UsageError(f"--vcpus {self.vcpus} must be 1..64")
        if not 1 <= self.vms <= MAX_VMS:
            raise UsageError(f"--vms {self.vms} must be 1..{MAX_VMS}")
        if not 1 <= self.vm_cycles <= MAX_VM_CYCLES:
            raise UsageError(f"--vm-cycles {self.vm_cycles} must be 1..{MAX_VM_CYCLES}")
        if self.duration_s is None and not 1 <= self.passes <= 0xFFFFFFFF:
            raise UsageError(f"--passes {self.passes} must be 1..2**32-1",
                             "or use --duration S to run for a time")
        if self.duration_s is not None and not self.duration_s > 0:
            raise UsageError(f"--duration {self.duration_s} must be > 0 seconds")
        if self.pattern not in PATTERNS:
            raise UsageError(f"unknown --pattern {self.pattern!r}",
                             f"use one of {', '.join(PATTERNS)}")
        if self.harvest not in HARVEST_MODES:
            raise UsageError(f"unknown --harvest {self.harvest!r}",
                             f"use one of {', '.join(HARVEST_MODES)}")
        if not 0 <= self.exit_every <= 0xFFFFFFFF:
            raise UsageError(f"--exit-every {self.exit_every} must be 0..2**32-1")
        for name in ("reaper_ms", "harvest_delay_us", "start_delay_ms"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must not be negative")
        if self.harvest != "on-full" and not self.reaper_ms > 0:
            raise UsageError("--reaper-ms must be > 0 with --harvest reaper or lazy")
        if self.name is not None and (not self.name or "\0" in self.name):
            raise UsageError("--name must be a non-empty string", "e.g. --name web01")
        if self.progress_ms is not None and not self.progress_ms > 0:
            raise UsageError(f"--progress-ms {self.progress_ms} must be > 0")
        if self.migrate_ms is not None:
            if not self.migrate_ms > 0:
                raise UsageError(f"--migrate-ms {self.migrate_ms} must be > 0")
            if len(usable_cpus()) < 2:
                raise UsageError("--migrate-ms needs at least 2 CPUs in this process's "
                                 "affinity mask", "run without taskset, or drop --migrate-ms")
        if self.trace is not None:
            if self.vcpus != len(self.trace.rings):
                raise UsageError(f"--vcpus {self.vcpus} differs from the {len(self.trace.rings)}"
                                 f" ring(s) of {self.trace.name}", "leave --vcpus out")
            return TraceLayout(self.trace)
        return GuestLayout(self.vcpus, self.pages, self.pattern, self.seed)


class _VmRun:
    """One VM of one cycle: its rings, harvester, stop flag and side threads."""

    def __init__(self, cfg: WorkloadConfig, vm: Vm, number: int, cycle: int, gen: int,
                 code: GuestCode) -> None:
        self.vm, self.number, self.cycle, self.gen, self.code = vm, number, cycle, gen, code
        self.rings = [RingState(vcpu, RingTruth(index=vcpu.index, vm_fd=vm.fd, vm_gen=gen,
                                                 cycle=cycle), cfg.keep_harvest)
                      for vcpu in vm.vcpus]
        self.interrupter = (ResetInterrupter(STOP_SIGNAL, cfg.seed * 1000 + number)
                            if cfg.interrupt_resets else None)
        self.harvester = Harvester(vm, self.rings, cfg.harvest_delay_us / 1e6,
                                   self.interrupter)
        self.stop = threading.Event()
        self.livelock = False
        self.threads: list[threading.Thread] = []

    def summary(self) -> dict[str, Any]:
        h = self.harvester
        return {"cycle": self.cycle, "vm_fd": self.vm.fd, "vm_gen": self.gen,
                "vcpu_fds": self.vm.vcpu_fds, "resets": h.resets,
                "reset_returned": h.reset_returned, "reset_eintr": h.reset_eintr,
                "reset_errno_eintr": h.reset_errno_eintr,
                "reset_mismatch": h.reset_mismatch,
                "interrupts_sent": self.interrupter.sent if self.interrupter else 0,
                "livelock": self.livelock}


class _Cycle:
    """The threads of one cycle (every VM at once) and how they stop."""

    def __init__(self, cfg: WorkloadConfig, vms: list[_VmRun], can_signal: bool) -> None:
        self.cfg, self.vms, self.can_signal = cfg, vms, can_signal
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.errors: list[BaseException] = []
        self._alive = sum(len(v.rings) for v in vms)
        self._alive_lock = threading.Lock()

    def vcpu_main(self, vmr: _VmRun, ring: RingState) -> None:
        try:
            self._vcpu_loop(vmr, ring)
        except BaseException as err:  # reported by run_workload in the main thread
            self.errors.append(err)
            self.stop_all()
        finally:
            ring.done = True
            with self._alive_lock:
                self._alive -= 1
                if self._alive == 0:
                    self.finished.set()

    def _vcpu_loop(self, vmr: _VmRun, ring: RingState) -> None:
        res, vcpu, mode = ring.res, ring.vcpu, self.cfg.harvest
        res.tid = threading.get_native_id()
        streak = 0
        marks = vmr.code.mark_port is not None
        stalled_at: int | None = None
        start, cpu0 = time.monotonic_ns(), time.thread_time_ns()
        while not vmr.stop.is_set():
            if stalled_at is not None:
                res.stall_ns += time.monotonic_ns() - stalled_at
                stalled_at = None
            res.kvm_runs += 1
            try:
                reason = vcpu.run()
            except OSError as err:
                if err.errno != errno.EINTR:  # EINTR: a stop or an interrupt signal
                    raise describe_oserror(f"KVM_RUN on vCPU {vcpu.index}", err) from None
                reason = k.KVM_EXIT_INTR
            name = k.EXIT_NAMES.get(reason, str(reason))
            res.exits[name] = res.exits.get(name, 0) + 1
            if reason == k.KVM_EXIT_IO and marks and vcpu.io_exit().port == MARK_PORT:
                res.marks += 1  # the trace's harvest point: harvest this ring and reset
                vmr.harvester.harvest([ring], always_reset=True)
                continue
            if reason in (k.KVM_EXIT_IO, k.KVM_EXIT_INTR):
                continue
            if reason == k.KVM_EXIT_HLT:
                res.halted = True
                break
            if reason != k.KVM_EXIT_DIRTY_RING_FULL:
                raise KvmtraceError(f"guest on vCPU {vcpu.index} stopped with exit reason "
                                    f"{reason} ({name})", "this is a kvmtrace bug; report it")
            stalled_at = time.monotonic_ns()
            res.soft_full_exits += 1
            if mode == "lazy":
                vmr.harvester.wait_for_reaper(ring, vmr.stop)
            else:
                vmr.harvester.harvest([ring], always_reset=True)
            # livelock: nothing harvested from this ring (by anyone) since its last exit 31
            streak = streak + 1 if res.harvested == ring.full_mark else 0
            ring.full_mark = res.harvested
            if streak >= LIVELOCK_EXITS:
                res.livelock = vmr.livelock = True
                self.stop_vm(vmr)
        now = time.monotonic_ns()
        if stalled_at is not None:
            res.stall_ns += now - stalled_at
        res.run_ns = now - start
        res.cpu_ns = time.thread_time_ns() - cpu0
        regs = vcpu.get_regs()
        res.pages_written = vmr.code.writes_done(regs.rdx, regs.rip)

    def reaper_main(self, vmr: _VmRun, done: threading.Event) -> None:
        try:
            while not done.wait(self.cfg.reaper_ms / 1e3):
                vmr.harvester.reaper_cycle()
        except BaseException as err:
            self.errors.append(err)
            self.stop_all()

    def stop_vm(self, vmr: _VmRun) -> None:
        """Stop one VM's vCPUs: immediate_exit, then signal threads that may be in KVM_RUN."""
        vmr.stop.set()
        for ring in vmr.rings:
            ring.vcpu.set_immediate_exit(True)
        for thread in vmr.threads:
            if thread.is_alive() and thread.ident is not None and self.can_signal:
                try:
                    signal.pthread_kill(thread.ident, STOP_SIGNAL)
                except ProcessLookupError:
                    pass

    def stop_all(self) -> None:
        self.stop.set()
        for vmr in self.vms:
            self.stop_vm(vmr)
        self.finished.set()


def _noop(_signum: int, _frame: object) -> None:
    """SIGUSR1 handler: its only job is to make KVM_RUN (or a reset) return early."""


def _install_stop_handler() -> tuple[bool, object]:
    try:
        return True, signal.signal(STOP_SIGNAL, _noop)
    except ValueError:  # not the main thread: usable only if someone installed a handler
        current = signal.getsignal(STOP_SIGNAL)
        return current not in (signal.SIG_DFL, signal.SIG_IGN, None), None


def _install_end_handlers(cycle: _Cycle, interrupted: list[str]) -> dict[int, Any]:
    """SIGINT/SIGTERM end the run as --duration does: the vCPUs stop, the rings are
    harvested a last time and the result is reported (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def end(signum: int, _frame: object) -> None:
        if not interrupted:
            interrupted.append(signal.Signals(signum).name)
        cycle.finished.set()

    return {s: signal.signal(s, end) for s in (signal.SIGINT, signal.SIGTERM)}


def run_workload(config: WorkloadConfig) -> WorkloadResult:
    """Create the VMs, run the guest on ``config.vcpus`` threads each, harvest, report;
    ``config.vm_cycles`` times.

    Raises UsageError/MissingFeature (one line + fix) for bad settings or a host without
    /dev/kvm or the dirty ring.
    """
    layout = config.validate()
    code = assemble(config.exit_every,
                    mark_port=MARK_PORT if config.trace is not None else None)
    if config.start_delay_ms:
        time.sleep(config.start_delay_ms / 1e3)
    can_signal, old_handler = _install_stop_handler()
    if not can_signal and (config.interrupt_resets or (
            config.exit_every == 0 and config.duration_s is not None)):
        raise UsageError("--interrupt-resets, and --exit-every 0 with --duration, need a "
                         "SIGUSR1 handler", "call run_workload from the main thread")
    kvm_fd = open_kvm()
    try:
        return _run(config, layout, code, kvm_fd, can_signal)
    except OSError as err:
        raise describe_oserror("KVM setup", err) from None
    finally:
        os.close(kvm_fd)
        if old_handler is not None:
            signal.signal(STOP_SIGNAL, old_handler)  # type: ignore[arg-type]


def _run(cfg: WorkloadConfig, layout: GuestLayout | TraceLayout, code: GuestCode, kvm_fd: int,
         can_signal: bool) -> WorkloadResult:
    passes = 0 if cfg.duration_s is not None else cfg.passes
    fd_uses: dict[int, int] = {}
    rings: list[RingState] = []
    vm_runs: list[dict[str, Any]] = []
    interrupted: list[str] = []
    first: Vm | None = None
    t0 = time.monotonic_ns()
    for cycle in range(cfg.vm_cycles):
        vms: list[Vm] = []
        try:
            for _ in range(cfg.vms):
                vm = Vm(cfg.ring_bytes, layout.memory_bytes, kvm_fd, layout.regions())
                vms.append(vm)
                assert vm.memory is not None
                layout.load(vm.memory, code)
                for vcpu in vm.add_vcpus(cfg.vcpus):
                    vcpu.enter_protected_mode()
                    vcpu.set_regs(layout.initial_regs(vcpu.index, passes, cfg.exit_every,
                                                      code))
            runs = []
            for number, vm in enumerate(vms):
                runs.append(_VmRun(cfg, vm, number, cycle, fd_uses.get(vm.fd, 0), code))
                fd_uses[vm.fd] = fd_uses.get(vm.fd, 0) + 1
            _run_cycle(cfg, runs, can_signal, interrupted)
            first = first or vms[0]
            for vmr in runs:
                _finish_rings(vmr, layout)
                rings += vmr.rings
                vm_runs.append(vmr.summary())
        finally:
            for vm in vms:
                vm.close()
        if interrupted:
            break
    wall = time.monotonic_ns() - t0
    entries = entries_from_bytes(cfg.ring_bytes)
    assert first is not None
    return WorkloadResult(
        pid=os.getpid(), vm_fd=vm_runs[0]["vm_fd"], cap=first.cap, ring_bytes=cfg.ring_bytes,
        ring_entries=entries, soft_limit=soft_limit_of(entries),
        vcpus=cfg.vcpus, pages=layout.pages, passes=passes, duration_s=cfg.duration_s,
        pattern=layout.pattern, seed=layout.seed, exit_every=cfg.exit_every, harvest=cfg.harvest,
        reaper_ms=cfg.reaper_ms, harvest_delay_us=cfg.harvest_delay_us,
        rings=[r.res for r in rings], resets=sum(v["resets"] for v in vm_runs),
        reset_returned=sum(v["reset_returned"] for v in vm_runs),
        livelock=any(v["livelock"] for v in vm_runs), wall_ns=wall,
        harvest_log=[r.log or [] for r in rings] if cfg.keep_harvest else None,
        interrupted=interrupted[0] if interrupted else None, vms=cfg.vms,
        vm_cycles=cfg.vm_cycles, migrate_ms=cfg.migrate_ms,
        interrupt_resets=cfg.interrupt_resets,
        reset_eintr=sum(v["reset_eintr"] for v in vm_runs),
        reset_mismatch=sum(v["reset_mismatch"] for v in vm_runs),
        interrupts_sent=sum(v["interrupts_sent"] for v in vm_runs), vm_runs=vm_runs,
        name=cfg.name, replay=cfg.trace.name if cfg.trace is not None else None)


def _run_cycle(cfg: WorkloadConfig, runs: list[_VmRun], can_signal: bool,
               interrupted: list[str]) -> None:
    cycle = _Cycle(cfg, runs, can_signal)
    side_done = threading.Event()
    side: list[threading.Thread] = []
    for vmr in runs:
        vmr.threads = [threading.Thread(target=cycle.vcpu_main, args=(vmr, r), daemon=True,
                                        name=f"vm{vmr.number}.vcpu{r.res.index}")
                       for r in vmr.rings]
        if cfg.harvest != "on-full":
            side.append(threading.Thread(target=cycle.reaper_main, args=(vmr, side_done),
                                         name=f"vm{vmr.number}.reaper", daemon=True))
        if vmr.interrupter is not None:
            side.append(threading.Thread(target=vmr.interrupter.main, args=(side_done,),
                                         name=f"vm{vmr.number}.interrupter", daemon=True))
    all_rings = [r for vmr in runs for r in vmr.rings]
    migrator = None
    if cfg.migrate_ms is not None:
        migrator = Migrator(cfg.migrate_ms / 1e3,
                            lambda: [0 if r.done else r.res.tid for r in all_rings],
                            usable_cpus())
        side.append(threading.Thread(target=migrator.main, args=(side_done,),
                                     name="migrator", daemon=True))
    if cfg.progress_ms is not None:
        reporter = Heartbeat(
            cfg.progress_ms / 1e3,
            lambda: [(vmr.number, r.res.index, r.res.harvested, 0 if r.done else r.res.tid)
                     for vmr in runs for r in vmr.rings])
        side.append(threading.Thread(target=reporter.main, args=(side_done,),
                                     name="progress", daemon=True))
    for thread in side:
        thread.start()
    for vmr in runs:
        for thread in vmr.threads:
            thread.start()
    old = _install_end_handlers(cycle, interrupted)
    try:
        cycle.finished.wait(cfg.duration_s)
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        cycle.stop_all()
        for vmr in runs:
            for thread in vmr.threads:
                thread.join()
        try:
            for vmr in runs:  # the reapers may still run: the harvester lock serializes
                vmr.harvester.harvest(vmr.rings, always_reset=True)
        finally:  # no side thread may outlive the cycle: the VMs are closed next
            side_done.set()
            for thread in side:
                thread.join()
    if migrator is not None:
        for i, ring in enumerate(all_rings):
            ring.res.migrations = migrator.moves[i]
            ring.res.cpus = sorted(migrator.cpus[i])
    if cycle.errors:
        err = cycle.errors[0]
        raise err if isinstance(err, KvmtraceError) else KvmtraceError(
            f"vCPU thread failed: {err!r}", "this is a kvmtrace bug; report it") from err


def _finish_rings(vmr: _VmRun, layout: GuestLayout | TraceLayout) -> None:
    """Per ring: distinct, lost pages and entries left DIRTY, after the final harvest."""
    for ring in vmr.rings:
        res = ring.res
        written = layout.written_entries(res.index, res.pages_written)
        lost = written - ring.seen
        res.distinct = len(ring.seen)
        res.distinct_written = len(written)
        res.lost_suspected = len(lost)
        res.lost_pages = [list(p) for p in sorted(lost)]
        res.unexpected = len(ring.seen - written)
        res.unreset = res.harvested - res.entries_reset
        dirty = ring.vcpu.ring
        res.left_dirty = dirty.flags_range(0, dirty.entries).count(KVM_DIRTY_GFN_F_DIRTY)
