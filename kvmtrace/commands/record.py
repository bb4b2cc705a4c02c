"""``kvmtrace record``: every dirty-ring event into a compact, lossless recording."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from ..analysis.stuck import EventStuck
from ..bpf.event_source import LiveEvents
from ..bpf.percpu import RING_PAGES
from ..bpf.vmident import VmmsBelow
from ..core.counters import VmName
from ..core.events import Kind, ring_sizes, take_records, vm_pairs
from ..errors import UsageError
from ..host.child import PausedChild, check_command, exit_status
from ..host.outfile import check_output
from ..host.vmnames import resolve
from ..source.recording import RecordingWriter
from .args import (
    HOOKS,
    MAX_SECONDS,
    add_command,
    add_no_cache,
    add_pid,
    add_subcommand,
    apply_no_cache,
    check_pid,
    command_of,
    integer,
    number,
)

__all__ = ["register", "run", "RecordSummary", "record", "check_flags"]

EXAMPLES = """examples:
  kvmtrace record -o run.kvt                      # every VM, until Ctrl-C
  kvmtrace record -o run.kvt -p 4242 --duration 10
  kvmtrace record -o run.kvt -- kvmtrace workload --vcpus 2 --pages 1000
  kvmtrace replay run.kvt                         # then check it against the ring model

exit status: 0, or with -- COMMAND the command's own status when it fails (the
recording is saved first, like perf record); 2 bad flags; 128+N COMMAND killed by signal N
"""
#: largest --ringbuf-pages: 256 MiB of 4 KiB pages per CPU
MAX_RING_PAGES = 1 << 16


def register(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "record",
        help="record every dirty-ring event to a file",
        description="Record every push, reset and soft-full exit (and the stall and reset "
        "latencies) with timestamps into a compact recording; like perf record. "
        "Events the kernel side could not deliver are counted and stored in the file.",
        epilog=EXAMPLES, run=run,
    )
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="recording to write")
    add_pid(p)
    p.add_argument("--duration", type=number("--duration", 0, MAX_SECONDS, low_open=True,
                                             example="10"),
                   metavar="S", help="stop after S seconds")
    p.add_argument("--ringbuf-pages", type=integer("--ringbuf-pages", 1, MAX_RING_PAGES,
                                                   power_of_two=True, example="1024"),
                   default=RING_PAGES, metavar="N",
                   help="pages of each CPU's event ring, a power of two (default "
                   f"{RING_PAGES}: {RING_PAGES * 4 // 1024} MiB per CPU)")
    p.add_argument("--hook", choices=HOOKS, default="auto",
                   help="raw tracepoints or tracepoints (default: best available)")
    add_no_cache(p)
    add_command(p, "run COMMAND and record its VMs until it exits; exit with its status "
                "when it fails")


@dataclass
class RecordSummary:
    events: int
    lost: int
    bytes: int
    seconds: float
    pushes: int
    #: COMMAND's exit status if it ended by itself (negative: killed by that signal), else
    #: None (no COMMAND, or still running when recording stopped and so ended by record)
    child_status: int | None
    #: where an earlier recording at the output path was moved (FILE.old), if any
    old: Path | None = None
    #: (pid, vm, ring) -> why it is stuck (kvmtrace.analysis.stuck), for flagged rings
    stuck: dict[tuple[int, int, int], str] = field(default_factory=dict)

    def line(self, path: str) -> str:
        """One line; stuck rings (overflowed, stranded, or soft-full exits without reset
        progress) are named after it: ``; STUCK rings: pid:vm:ring reason, ...``."""
        per = self.bytes / self.events if self.events else 0.0
        out = (f"recorded {self.events} events ({self.pushes} pushes) in {self.seconds:.1f} s, "
               f"{self.lost} lost events, {self.bytes} bytes ({per:.2f} bytes/event) to {path}")
        if self.stuck:
            out += "; STUCK rings: " + ", ".join(
                f"{pid}:{vm}:{ring} {why}" for (pid, vm, ring), why in sorted(self.stuck.items()))
        return out


class _Names:
    """Per (pid, vm) seen in the events, the VM's name, VMM kind and comm from /proc
    (kvmtrace.host.vmnames), looked up once per process while it still runs. ``-- COMMAND``
    is also looked up on every pass of the loop (:meth:`watch`) until its events come, so
    a VMM that ends before its first events are read still has its name (and the comm
    last seen, which may be the launcher's if it never ran one pass after exec)."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, int]] = set()
        self.by_pid: dict[int, VmName] = {}
        self.last: dict[int, VmName] = {}

    def watch(self, pid: int) -> None:
        if pid not in self.by_pid:
            who = resolve(pid)
            if who.comm:
                self.last[pid] = who

    def learn(self, batch: np.ndarray) -> dict[tuple[int, int], VmName]:
        pid, vm = batch["pid"], batch["vm"]
        if pid.min() == pid.max() and vm.min() == vm.max():  # one VM: 4 reductions
            keys = {(int(pid[0]), int(vm[0]))} - self.seen
        else:
            keys = set(vm_pairs(batch)) - self.seen
        new: dict[tuple[int, int], VmName] = {}
        for pid, vm in keys:
            if pid <= 0:
                continue
            who = self.by_pid.get(pid)
            if who is None:
                who = resolve(pid)
                if who.comm:  # still running: its answer holds for its later VMs
                    self.by_pid[pid] = who
                else:
                    who = self.last.get(pid, who)
            self.seen.add((pid, vm))
            new[(pid, vm)] = who
        return new


#: by kind (u8): the events the loop looks at one by one (stuck rings, ring sizes)
_RARE = np.zeros(256, bool)
_RARE[[Kind.RESET, Kind.EXIT, Kind.RING_SIZE]] = True


class _Look:
    """What the loop takes from each batch, reading its kinds once: VM names (learnt once
    per (pid, vm)), pushes, stuck rings (:class:`~kvmtrace.analysis.stuck.EventStuck`)
    and ring sizes, both from the batch's few resets, exits and ring-size events."""

    def __init__(self) -> None:
        self.names = _Names()
        self.stuck = EventStuck()
        self.pushes = 0

    def batch(self, batch: np.ndarray) -> tuple[dict[tuple[int, int], VmName],
                                                 dict[tuple[int, int], int]]:
        """The VMs newly named and the ring sizes (pid, vm) -> entries ``batch`` gives."""
        learnt = self.names.learn(batch)
        kind = np.ascontiguousarray(batch["kind"])
        other = np.flatnonzero(kind != Kind.PUSH)  # a few in a thousand
        self.pushes += len(batch) - len(other)
        at = other[_RARE[kind[other]]]
        if not len(at):
            return learnt, {}
        rare = take_records(batch, at)  # numpy's take of a few structured rows: ~15 us
        self.stuck.feed(rare)
        return learnt, ring_sizes(rare) if (kind[at] == Kind.RING_SIZE).any() else {}


def _buffer_meta(writer: RecordingWriter, source: LiveEvents) -> None:
    """Meta ``extra`` of the per-CPU ring buffers, when changed: ``lost_per_buffer`` (lost
    events of each CPU's buffer), ``merge_late`` and ``merge_reordered`` (events read too
    late for the time merge, events put in index order: kvmtrace.bpf.percpu)."""
    got = {"lost_per_buffer": source.lost_per_buffer(), "merge_late": source.reader.late,
           "merge_reordered": source.reader.reordered}
    if any(writer.meta.extra.get(k) != v for k, v in got.items()):
        writer.update_meta(extra=got)


def record(output: Path, *, pid: int = 0, duration: float | None = None,
           command: list[str] | None = None, ringbuf_pages: int = RING_PAGES,
           hook: str = "auto",
           flush_s: float = 1.0, quiet: bool = False,
           stdout: IO[bytes] | int | None = None) -> RecordSummary:
    """Record until Ctrl-C/SIGTERM, ``duration`` seconds, or COMMAND's exit; COMMAND's
    standard output goes to ``stdout`` (None: this process's)."""
    child = PausedChild(command, stdout=stdout) if command else None
    if child is not None:
        pid = pid or child.pid
    try:
        # -- COMMAND: its whole process tree (a wrapper that forks the VMM)
        source = LiveEvents(pid=pid, ringbuf_pages=ringbuf_pages, hook=hook,
                            follow=child is not None)
    except BaseException:
        if child is not None:
            child.stop(kill=True)
        raise
    # how the probes name VMs (kvmtrace.bpf.loader.Probes): "pointer", or "thread" where
    # the kernel lacks BTF; then VMs created before recording have pushes with vm = -1
    source.meta.extra["vm_identity"] = source.probes.vm_identity
    if source.probes.vm_identity == "thread" and child is None and not quiet:
        print("kvmtrace record: this kernel gives no VM identity for VMs created before "
              "recording (no BTF): their pushes and exits are recorded with vm -1",
              file=sys.stderr)
    stop = source.stop
    old = {s: signal.signal(s, lambda *_: stop()) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    events = 0
    look = _Look()
    try:
        with source, RecordingWriter(output, source.meta, keep_old=True) as writer:
            writer.flush()  # the header and meta are on disk before the first event
            if child is not None:
                child.release()
            elif not quiet:
                print("Recording dirty-ring events... Hit Ctrl-C to end.", file=sys.stderr)
            last_flush = time.monotonic()
            names = look.names
            # a VMM below COMMAND that the probes cannot follow (no sched tracepoints)
            below = VmmsBelow(child.pid) \
                if child is not None and not source.probes.follow else None
            for batch in source.batches():
                if len(batch):
                    learnt, sizes = look.batch(batch)
                    if learnt:
                        writer.update_meta(vms=learnt)
                    writer.write(batch)
                    events += len(batch)
                    if sizes:
                        writer.update_meta(ring_entries=sizes)
                now = time.monotonic()
                if now - last_flush >= flush_s:
                    writer.add_lost(source.lost - writer.lost)
                    _buffer_meta(writer, source)
                    writer.flush()
                    last_flush = now
                if duration is not None and now - t0 >= duration:
                    stop()
                if child is not None and child.poll() is not None:
                    stop()
                elif child is not None:
                    names.watch(child.pid)
                if below is not None:
                    below.watch()
            writer.add_lost(source.lost - writer.lost)
            _buffer_meta(writer, source)
            lost = writer.lost
            warning = below.warning("record", "recorded 0 events") \
                if below is not None and not events else None
            if warning and not quiet:
                print(warning, file=sys.stderr)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        # COMMAND's own status if it ended by itself, not the one of stopping it here
        own_status = child.poll() if child is not None else None
        if child is not None:
            child.stop()
    return RecordSummary(events=events, lost=lost, bytes=output.stat().st_size,
                         seconds=time.monotonic() - t0, pushes=look.pushes,
                         child_status=own_status,
                         stuck=look.stuck.stuck(), old=writer.old)


def check_flags(args: argparse.Namespace) -> list[str]:
    """Every check that needs no BPF and writes nothing; returns ``-- COMMAND``."""
    command = command_of(args)
    if command and args.pid:
        raise UsageError("-p and -- COMMAND cannot be combined",
                         "give -p PID to record a running VMM, or -- COMMAND to start one")
    if command:
        check_command(command)
    check_pid(args.pid)
    return command


def run(args: argparse.Namespace) -> int:
    command = check_flags(args)
    apply_no_cache(args)
    # refused here (symlink, directory, no such directory); FILE itself is only replaced,
    # and an earlier FILE moved to FILE.old, when the recording is complete
    out = check_output(args.output, flag="-o")
    summary = record(out, pid=args.pid, duration=args.duration, command=command or None,
                     ringbuf_pages=args.ringbuf_pages, hook=args.hook)
    if summary.old is not None:
        print(f"kvmtrace record: moved the existing {out} to {summary.old}", file=sys.stderr)
    print(summary.line(str(out)), file=sys.stderr)
    return exit_status(summary.child_status)
