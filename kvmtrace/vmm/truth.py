"""What a workload run reports: per-ring ground truth, JSON and an 80-column text summary."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RingTruth", "WorkloadResult"]


@dataclass
class RingTruth:
    """Ground truth for one vCPU's dirty ring (``struct kvm_dirty_ring`` of vCPU ``index``).

    pages_written: guest writes that could dirty a page (exact, from the guest's counter).
    harvested: entries the VMM collected; distinct: distinct (slot, offset) among them.
    soft_full_exits: KVM_EXIT_DIRTY_RING_FULL (31) returns seen by userspace.
    stall_ns: time from KVM_RUN returning exit 31 to the next KVM_RUN call (ns).
    run_ns: wall time of the vCPU thread's run loop (ns). kvm_runs: KVM_RUN calls.
    cpu_ns: CPU time of the vCPU thread over its run loop (ns, CLOCK_THREAD_CPUTIME_ID:
    guest, kernel and user time; unlike run_ns, not grown by waiting for a busy CPU).
    entries_reset: harvested entries the kernel reset, read back from the ring after each
    KVM_RESET_DIRTY_RINGS (exact also when a signal cut a call short).
    unreset: harvested entries the kernel never reset (its walk stopped at an entry the
    ring's overflow pushed over them; 0 unless an overflow left the ring stuck).
    reset_events: KVM_RESET_DIRTY_RINGS calls whose walk finished this ring, i.e. the
    ``kvm_dirty_ring_reset`` tracepoints it got (an interrupted call emits none for the ring
    it stopped in, nor for the rings after it).
    distinct_written: distinct pages the guest wrote (= pages_written when no page was
    written twice; then each write pushed once, as the slot starts dirty-logged, and
    pages_written = harvested + lost_suspected exactly).
    lost_suspected: distinct pages written but never harvested; lost_pages: those pages as
    sorted [slot, offset] pairs (overwritten by an overflow or stranded after one).
    left_dirty: entries still flagged DIRTY in the ring after the final harvest (pushed,
    not overwritten, never harvested: 0 unless an overflow left the ring stuck).
    unexpected: harvested entries that are not pages this vCPU wrote (should be 0).
    vm_fd, vm_gen, cycle: the VM's fd, how many earlier VMs of this run had that fd, and
    the --vm-cycles round (0-based). migrations / cpus: re-pins to another CPU by
    --migrate-ms and the CPUs the thread was pinned to. marks: harvests + resets at the
    trace's harvest points (``--replay``: marked table entries, I/O exits to MARK_PORT).
    """

    index: int
    vm_fd: int = -1
    vm_gen: int = 0
    cycle: int = 0
    tid: int = 0
    pages_written: int = 0
    distinct_written: int = 0
    harvested: int = 0
    distinct: int = 0
    soft_full_exits: int = 0
    stall_ns: int = 0
    run_ns: int = 0
    cpu_ns: int = 0
    kvm_runs: int = 0
    entries_reset: int = 0
    lost_suspected: int = 0
    unexpected: int = 0
    unreset: int = 0
    reset_events: int = 0
    left_dirty: int = 0
    migrations: int = 0
    marks: int = 0
    halted: bool = False
    livelock: bool = False
    exits: dict[str, int] = field(default_factory=dict)
    cpus: list[int] = field(default_factory=list)
    lost_pages: list[list[int]] = field(default_factory=list)

    @property
    def pushes_per_s(self) -> float:
        """Harvested entries per second of this vCPU's run."""
        return self.harvested * 1e9 / self.run_ns if self.run_ns else 0.0


@dataclass
class WorkloadResult:
    """The whole run; ``to_json()`` is the ground truth later tests compare against.

    ``vm_fd`` is the first VM's fd number in process ``pid``; ``cap`` is the capability
    enabled (192 KVM_CAP_DIRTY_LOG_RING, 223 KVM_CAP_DIRTY_LOG_RING_ACQ_REL). ``resets``
    counts KVM_RESET_DIRTY_RINGS ioctls (retries included) and ``reset_returned`` sums what
    they returned (entries). ``rings`` holds every ring of every VM of every cycle in
    (cycle, VM, index) order; ``vm_runs`` one entry per VM per cycle. ``reset_eintr``:
    calls a signal cut short (seen in the rings, or errno EINTR), each retried;
    ``reset_mismatch``: calls whose return value differs from the entries read back as
    reset (0 unless the kernel and the VMM disagree); ``interrupts_sent``: signals sent by
    --interrupt-resets. ``replay``: the trace ``--replay`` ran (then ``pattern`` is
    "trace" and ``pages`` the longest ring's writes).
    """

    pid: int
    vm_fd: int
    cap: int
    ring_bytes: int
    ring_entries: int
    soft_limit: int
    vcpus: int
    pages: int
    passes: int
    duration_s: float | None
    pattern: str
    seed: int
    exit_every: int
    harvest: str
    reaper_ms: float
    harvest_delay_us: float
    rings: list[RingTruth]
    resets: int = 0
    reset_returned: int = 0
    livelock: bool = False
    wall_ns: int = 0
    harvest_log: list[list[tuple[int, int]]] | None = None
    interrupted: str | None = None  # "SIGINT"/"SIGTERM" when a signal ended the run early
    vms: int = 1
    vm_cycles: int = 1
    migrate_ms: float | None = None
    interrupt_resets: bool = False
    reset_eintr: int = 0
    reset_mismatch: int = 0
    interrupts_sent: int = 0
    vm_runs: list[dict[str, Any]] = field(default_factory=list)
    name: str | None = None  # --name: what kvmtrace.host.vmnames finds on the command line
    replay: str | None = None

    @property
    def entries_reset(self) -> int:
        return sum(r.entries_reset for r in self.rings)

    @property
    def lost_suspected(self) -> int:
        return sum(r.lost_suspected for r in self.rings)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("harvest_log")
        data["entries_reset"] = self.entries_reset
        data["lost_suspected"] = self.lost_suspected
        return data

    def to_json(self) -> str:
        """One JSON object (one line)."""
        return json.dumps(self.to_dict(), sort_keys=False)

    def harvest_dump(self) -> dict[str, Any]:
        """Per ring, every harvested [slot, offset] in harvest order (needs the log kept);
        the shape of ``replay --dump-harvest``: each ring names ``pid`` and ``vm`` (the
        fd), rings in (cycle, VM, index) order; top-level ``vm_fd`` is null when the rings
        belong to several VMs."""
        log = self.harvest_log or [[] for _ in self.rings]
        vms = {(r.vm_fd, r.vm_gen) for r in self.rings}
        return {"pid": self.pid, "vm_fd": self.vm_fd if len(vms) <= 1 else None,
                "ring_entries": self.ring_entries,
                "rings": [{"pid": self.pid, "vm": r.vm_fd if r.vm_fd >= 0 else self.vm_fd,
                           "index": r.index, "harvested": [list(e) for e in entries]}
                          for r, entries in zip(self.rings, log, strict=True)]}

    def summary(self) -> str:
        """A short text report, at most 80 columns wide: one row per ring, with its cycle
        (``cy``) and VM (fd, ``5#1`` for the second VM under fd 5); ``lost`` is the ring's
        lost pages (``lost_suspected``: written, never harvested)."""
        how = f"{self.passes} pass(es)" if self.duration_s is None else f"{self.duration_s} s"
        vms = (f"{self.vms} VMs x {self.vcpus} vCPU(s)" if self.vms > 1
               else f"vm fd {self.vm_fd}, {self.vcpus} vCPU(s)")
        cycles = f", {self.vm_cycles} cycles" if self.vm_cycles > 1 else ""
        lines = [
            f"kvmtrace workload: pid {self.pid}, {vms}{cycles}, cap {self.cap}",
            f"ring {self.ring_bytes} B = {self.ring_entries} entries (soft limit "
            f"{self.soft_limit}); {self.pages} pages/vCPU {self.pattern}, {how}",
            f"exit every {self.exit_every or 'never'}; harvest {self.harvest}; "
            f"{self.resets} resets; {self.wall_ns / 1e9:.3f} s"
            + ("; LIVELOCK" if self.livelock else "")
            + (f"; ended early by {self.interrupted}" if self.interrupted else ""),
        ]
        extra = []
        if self.replay is not None:
            marks = sum(r.marks for r in self.rings)
            extra.append(f"replaying {self.replay.rsplit('/', 1)[-1]}: {marks} "
                         "harvest(s) at its harvest points")
        if self.interrupt_resets or self.reset_eintr:
            extra.append(f"{self.reset_eintr} reset(s) cut short by a signal and retried "
                         f"({self.interrupts_sent} sent)")
        if self.migrate_ms is not None:
            moves = sum(r.migrations for r in self.rings)
            extra.append(f"vCPUs re-pinned every {self.migrate_ms:g} ms ({moves} moves)")
        if self.reset_mismatch:
            extra.append(f"{self.reset_mismatch} reset(s) returned another count than "
                         "the rings show")
        lines += extra
        lines += ["", f"{'cy':>2} {'vm':>4} {'ring':>4} {'written':>9} {'harvested':>9} "
                  f"{'distinct':>8} {'lost':>6} {'full':>5} {'stall ms':>8} {'run ms':>8} "
                  f"{'push/s':>7}"]
        for r in self.rings:
            vm = f"{r.vm_fd}#{r.vm_gen}" if r.vm_gen else str(r.vm_fd)
            lines.append(
                f"{r.cycle:>2} {vm:>4} {r.index:>4} {r.pages_written:>9} {r.harvested:>9} "
                f"{r.distinct:>8} {r.lost_suspected:>6} {r.soft_full_exits:>5} "
                f"{r.stall_ns / 1e6:>8.2f} {r.run_ns / 1e6:>8.1f} {_rate(r.pushes_per_s):>7}")
        if self.lost_suspected:
            lines.append(f"{self.lost_suspected} lost page(s), written but never harvested: "
                         "the ring overflowed")
        stuck = sum(1 for r in self.rings if r.left_dirty or r.unreset)
        if stuck:
            lines.append(f"{stuck} ring(s) stuck: entries left that no harvest or reset "
                         "can reach")
        if self.livelock:
            lines.append("livelock: exit 31 kept coming, nothing to harvest; VM stopped")
        return "\n".join(lines)


def _rate(value: float) -> str:
    """A rate in at most 7 characters: 123456, 1.23M, 1234.5G."""
    if value < 1e6:
        return f"{value:.0f}"
    return f"{value / 1e6:.2f}M" if value < 1e9 else f"{value / 1e9:.1f}G"
