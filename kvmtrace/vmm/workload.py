"""Run the built-in guest on N vCPU threads and harvest their dirty rings like a VMM.

Harvest modes: ``on-full``: a vCPU harvests its own ring and resets on exit 31;
``reaper``: a reaper thread harvests every ring every ``reaper_ms`` and vCPUs also harvest
on exit 31; ``lazy``: on exit 31 a vCPU only waits for the reaper's next cycle. Every
harvest+reset is serialized by one VM lock (KVM_RESET_DIRTY_RINGS acts on all rings). At
the end, one final harvest of every ring and one reset account for every entry. A vCPU
that gets exit 31 with nothing harvestable LIVELOCK_EXITS times in a row is a livelock
(the ring overflowed): the run is reported and ended.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..errors import KvmtraceError, UsageError
from . import kvm as k
from .guest import PATTERNS, GuestCode, GuestLayout, assemble
from .result import RingResult, WorkloadResult
from .vm import Vcpu, Vm, check_ring_bytes, describe_oserror

__all__ = ["HARVEST_MODES", "LIVELOCK_EXITS", "STOP_SIGNAL", "WorkloadConfig", "run_workload"]

HARVEST_MODES = ("on-full", "reaper", "lazy")
LIVELOCK_EXITS = 3
STOP_SIGNAL = signal.SIGUSR1  # kicks a vCPU thread out of KVM_RUN (EINTR)


@dataclass
class WorkloadConfig:
    """Shape of a run. ``passes`` is ignored when ``duration_s`` is set (run until then).
    ``keep_harvest`` keeps every harvested (slot, offset) for ``harvest_dump()``."""

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

    def validate(self) -> GuestLayout:
        """Check everything that does not need the kernel; returns the guest layout."""
        check_ring_bytes(self.ring_bytes)
        if not 1 <= self.vcpus <= 64:
            raise UsageError(f"--vcpus {self.vcpus} must be 1..64")
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
        return GuestLayout(self.vcpus, self.pages, self.pattern, self.seed)


class _Ring:
    """Mutable per-vCPU bookkeeping (result fields plus harvest state)."""

    def __init__(self, vcpu: Vcpu, keep: bool) -> None:
        self.vcpu = vcpu
        self.res = RingResult(index=vcpu.index)
        self.seen: set[tuple[int, int]] = set()
        self.log: list[tuple[int, int]] | None = [] if keep else None
        self.pending = 0  # harvested, not yet covered by a reset


class _Harvester:
    """Harvest + reset under one VM lock; counts resets and reaper cycles."""

    def __init__(self, vm: Vm, rings: list[_Ring], delay_s: float) -> None:
        self.vm, self.rings, self.delay_s = vm, rings, delay_s
        self.lock = threading.Lock()
        self.cycle = threading.Condition()
        self.cycles = 0
        self.resets = 0
        self.reset_returned = 0

    def harvest(self, rings: list[_Ring], always_reset: bool) -> int:
        """Harvest ``rings`` then KVM_RESET_DIRTY_RINGS (if ``always_reset`` or any entry
        was harvested). Returns the number of entries harvested."""
        if self.delay_s:
            time.sleep(self.delay_s)
        total = 0
        with self.lock:
            for ring in rings:
                entries = ring.vcpu.ring.harvest()
                ring.res.harvested += len(entries)
                ring.pending += len(entries)
                ring.seen.update(entries)
                if ring.log is not None:
                    ring.log.extend(entries)
                total += len(entries)
            if total or always_reset:
                try:
                    self.reset_returned += self.vm.reset_dirty_rings()
                except OSError as err:
                    raise describe_oserror("KVM_RESET_DIRTY_RINGS", err) from None
                self.resets += 1
                for ring in self.rings:  # the ioctl covers every ring of the VM
                    ring.res.entries_reset += ring.pending
                    ring.pending = 0
        return total

    def reaper_cycle(self) -> None:
        self.harvest(self.rings, always_reset=False)
        with self.cycle:
            self.cycles += 1
            self.cycle.notify_all()

    def wait_for_reaper(self, ring: _Ring, stop: threading.Event) -> int:
        """Lazy mode: block until the reaper completes a cycle; entries it took from ring."""
        before = ring.res.harvested
        with self.cycle:
            target = self.cycles + 1
            while self.cycles < target and not stop.is_set():
                self.cycle.wait(0.05)
        return ring.res.harvested - before


class _Run:
    """The threads of one run and how they stop."""

    def __init__(self, cfg: WorkloadConfig, vm: Vm, rings: list[_Ring], code: GuestCode,
                 can_signal: bool) -> None:
        self.cfg, self.vm, self.rings, self.code = cfg, vm, rings, code
        self.can_signal = can_signal
        self.harvester = _Harvester(vm, rings, cfg.harvest_delay_us / 1e6)
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.livelock = False
        self.errors: list[BaseException] = []
        self._alive = len(rings)
        self._alive_lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def vcpu_main(self, ring: _Ring) -> None:
        try:
            self._vcpu_loop(ring)
        except BaseException as err:  # reported by run_workload in the main thread
            self.errors.append(err)
            self.stop_all()
        finally:
            with self._alive_lock:
                self._alive -= 1
                if self._alive == 0:
                    self.finished.set()

    def _vcpu_loop(self, ring: _Ring) -> None:
        res, vcpu, mode = ring.res, ring.vcpu, self.cfg.harvest
        res.tid = threading.get_native_id()
        zero_streak = 0
        stalled_at: int | None = None
        start = time.monotonic_ns()
        while not self.stop.is_set():
            if stalled_at is not None:
                res.stall_ns += time.monotonic_ns() - stalled_at
                stalled_at = None
            res.kvm_runs += 1
            try:
                reason = vcpu.run()
            except OSError as err:
                if err.errno != errno.EINTR:
                    raise describe_oserror(f"KVM_RUN on vCPU {vcpu.index}", err) from None
                reason = k.KVM_EXIT_INTR
            name = k.EXIT_NAMES.get(reason, str(reason))
            res.exits[name] = res.exits.get(name, 0) + 1
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
                got = self.harvester.wait_for_reaper(ring, self.stop)
            else:
                got = self.harvester.harvest([ring], always_reset=True)
            zero_streak = 0 if got else zero_streak + 1
            if zero_streak >= LIVELOCK_EXITS:
                res.livelock = self.livelock = True
                self.stop_all()
        now = time.monotonic_ns()
        if stalled_at is not None:
            res.stall_ns += now - stalled_at
        res.run_ns = now - start
        regs = vcpu.get_regs()
        res.pages_written = self.code.writes_done(regs.rdx, regs.rip)

    def reaper_main(self, done: threading.Event) -> None:
        try:
            while not done.wait(self.cfg.reaper_ms / 1e3):
                self.harvester.reaper_cycle()
        except BaseException as err:
            self.errors.append(err)
            self.stop_all()

    def stop_all(self) -> None:
        """Stop every vCPU: set immediate_exit, then signal threads that may be in KVM_RUN."""
        self.stop.set()
        for ring in self.rings:
            ring.vcpu.set_immediate_exit(True)
        for thread in self.threads:
            if thread.is_alive() and thread.ident is not None and self.can_signal:
                try:
                    signal.pthread_kill(thread.ident, STOP_SIGNAL)
                except ProcessLookupError:
                    pass
        self.finished.set()


def _noop(_signum: int, _frame: object) -> None:
    """SIGUSR1 handler: its only job is to make KVM_RUN return EINTR."""


def _install_stop_handler() -> tuple[bool, object]:
    try:
        return True, signal.signal(STOP_SIGNAL, _noop)
    except ValueError:  # not the main thread: usable only if someone installed a handler
        current = signal.getsignal(STOP_SIGNAL)
        return current not in (signal.SIG_DFL, signal.SIG_IGN, None), None


def _install_end_handlers(run: _Run, interrupted: list[str]) -> dict[int, Any]:
    """SIGINT/SIGTERM end the run as --duration does: the vCPUs stop, the rings are
    harvested a last time and the result is reported (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def end(signum: int, _frame: object) -> None:
        if not interrupted:
            interrupted.append(signal.Signals(signum).name)
        run.finished.set()

    return {s: signal.signal(s, end) for s in (signal.SIGINT, signal.SIGTERM)}


def run_workload(config: WorkloadConfig) -> WorkloadResult:
    """Create the VM, run the guest on ``config.vcpus`` threads, harvest, and report.

    Raises UsageError/MissingFeature (one line + fix) for bad settings or a host without
    /dev/kvm or the dirty ring.
    """
    layout = config.validate()
    code = assemble(config.exit_every)
    if config.start_delay_ms:
        time.sleep(config.start_delay_ms / 1e3)
    can_signal, old_handler = _install_stop_handler()
    if not can_signal and config.exit_every == 0 and config.duration_s is not None:
        raise UsageError("--exit-every 0 with --duration needs a SIGUSR1 handler",
                         "call run_workload from the main thread")
    try:
        with Vm(config.ring_bytes, layout.memory_bytes) as vm:
            return _run(config, layout, code, vm, can_signal)
    except OSError as err:
        raise describe_oserror("KVM setup", err) from None
    finally:
        if old_handler is not None:
            signal.signal(STOP_SIGNAL, old_handler)  # type: ignore[arg-type]


def _run(cfg: WorkloadConfig, layout: GuestLayout, code: GuestCode, vm: Vm,
         can_signal: bool) -> WorkloadResult:
    assert vm.memory is not None
    layout.load(vm.memory, code)
    passes = 0 if cfg.duration_s is not None else cfg.passes
    rings = [_Ring(vcpu, cfg.keep_harvest) for vcpu in vm.add_vcpus(cfg.vcpus)]
    for ring in rings:
        ring.vcpu.enter_protected_mode()
        ring.vcpu.set_regs(layout.initial_regs(ring.vcpu.index, passes, cfg.exit_every))
    run = _Run(cfg, vm, rings, code, can_signal)
    run.threads = [threading.Thread(target=run.vcpu_main, args=(r,), name=f"vcpu{r.res.index}",
                                    daemon=True) for r in rings]
    reaper_done = threading.Event()
    reaper = threading.Thread(target=run.reaper_main, args=(reaper_done,), name="reaper",
                              daemon=True)
    t0 = time.monotonic_ns()
    if cfg.harvest != "on-full":
        reaper.start()
    for thread in run.threads:
        thread.start()
    interrupted: list[str] = []
    old = _install_end_handlers(run, interrupted)
    try:
        run.finished.wait(cfg.duration_s)
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        run.stop_all()
        for thread in run.threads:
            thread.join()
        reaper_done.set()
        if reaper.is_alive():
            reaper.join()
    run.harvester.harvest(rings, always_reset=True)
    wall = time.monotonic_ns() - t0
    if run.errors:
        err = run.errors[0]
        raise err if isinstance(err, KvmtraceError) else KvmtraceError(
            f"vCPU thread failed: {err!r}", "this is a kvmtrace bug; report it") from err
    for ring in rings:
        written = {(0, page) for page in layout.written_pages(ring.res.index,
                                                              ring.res.pages_written)}
        ring.res.distinct = len(ring.seen)
        ring.res.lost_suspected = len(written - ring.seen)
        ring.res.unexpected = len(ring.seen - written)
    entries = cfg.ring_bytes // k.DIRTY_GFN_BYTES
    return WorkloadResult(
        pid=os.getpid(), vm_fd=vm.fd, cap=vm.cap, ring_bytes=cfg.ring_bytes,
        ring_entries=entries, soft_limit=entries - k.KVM_DIRTY_RING_RSVD_ENTRIES,
        vcpus=cfg.vcpus, pages=cfg.pages, passes=passes, duration_s=cfg.duration_s,
        pattern=cfg.pattern, seed=cfg.seed, exit_every=cfg.exit_every, harvest=cfg.harvest,
        reaper_ms=cfg.reaper_ms, harvest_delay_us=cfg.harvest_delay_us,
        rings=[r.res for r in rings], resets=run.harvester.resets,
        reset_returned=run.harvester.reset_returned, livelock=run.livelock, wall_ns=wall,
        harvest_log=[r.log or [] for r in rings] if cfg.keep_harvest else None,
        interrupted=interrupted[0] if interrupted else None)
