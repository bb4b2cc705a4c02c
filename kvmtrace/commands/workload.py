"""`kvmtrace workload`: run the built-in dirty-ring guest and print its ground truth."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..core.kvm_abi import (
    GFN_BYTES,
    KVM_DIRTY_RING_MAX_ENTRIES,
    MIN_RING_BYTES,
    MIN_RING_ENTRIES,
    bytes_from_entries,
)
from ..errors import UsageError
from ..host.outfile import atomic_output, check_output
from ..source.detect import open_source
from ..vmm.guest import PATTERNS
from ..vmm.traced import TracePlan, plan_from_source
from ..vmm.workload import HARVEST_MODES, MAX_VM_CYCLES, MAX_VMS, WorkloadConfig, run_workload
from .args import MAX_SECONDS, add_json, add_subcommand, integer, number

__all__ = ["register", "run", "config_from_args", "load_trace"]

EPILOG = """examples:
  kvmtrace workload --vcpus 2 --pages 1000 --json
  kvmtrace workload --exit-every 0 --pages 300      # overflows a 256-entry ring
  kvmtrace workload --exit-every 0 --pages 20000    # stuck ring, livelock
  kvmtrace workload --duration 2 --harvest lazy --reaper-ms 20
  kvmtrace workload --exit-every 0 --harvest reaper --reaper-ms 1 --pages 8000
  kvmtrace workload --vms 2 --vcpus 2 --vm-cycles 3  # 2 VMs at once, fds reused
  kvmtrace workload --ring-entries 65536 --pages 66000 --exit-every 64 \\
      --interrupt-resets                            # resets cut short, retried
  kvmtrace workload --vcpus 2 --duration 2 --migrate-ms 5
  kvmtrace workload --replay run.kvt                # what run.kvt's rings did
  kvmtrace workload --replay trace.txt --ring-entries 512 --exit-every 16
"""


MAX_RING_BYTES = KVM_DIRTY_RING_MAX_ENTRIES * GFN_BYTES
MAX_MS = MAX_SECONDS * 1000  #: the longest period in milliseconds a flag takes


#: the value type of each numeric flag: a bad value is one line with the fix
_TYPES = {
    "--vcpus": integer("--vcpus", 1, 64, example="2"),
    "--ring-bytes": integer("--ring-bytes", MIN_RING_BYTES, MAX_RING_BYTES,
                            power_of_two=True, example="65536"),
    "--ring-entries": integer("--ring-entries", MIN_RING_ENTRIES, KVM_DIRTY_RING_MAX_ENTRIES,
                              power_of_two=True, example="4096"),
    "--pages": integer("--pages", 1, 1 << 24, example="1000"),
    "--passes": integer("--passes", 1, 0xFFFFFFFF, example="3"),
    "--duration": number("--duration", 0, MAX_SECONDS, low_open=True, example="2"),
    "--seed": integer("--seed", 0, (1 << 63) - 1, example="7"),
    "--exit-every": integer("--exit-every", 0, 0xFFFFFFFF, example="16"),
    "--reaper-ms": number("--reaper-ms", 0, MAX_MS, low_open=True, example="10"),
    "--harvest-delay-us": number("--harvest-delay-us", 0, MAX_MS * 1000, example="50"),
    "--start-delay-ms": number("--start-delay-ms", 0, MAX_MS, example="500"),
    "--vms": integer("--vms", 1, MAX_VMS, example="2"),
    "--vm-cycles": integer("--vm-cycles", 1, MAX_VM_CYCLES, example="3"),
    "--migrate-ms": number("--migrate-ms", 0, MAX_MS, low_open=True, example="5"),
    "--progress-ms": number("--progress-ms", 0, MAX_MS, low_open=True, example="100"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "workload", help="run a real guest that dirties pages through the dirty ring",
        description="Run the built-in VMM: N vCPU threads, each with its own dirty ring,\n"
        "each writing its own guest pages; harvest like a VMM, report per-ring counts.",
        epilog=EPILOG, run=run)
    p.add_argument("--vcpus", type=_TYPES["--vcpus"], metavar="N",
                   help="vCPU threads (1)")
    p.add_argument("--ring-bytes", type=_TYPES["--ring-bytes"], metavar="B",
                   help="dirty ring size per vCPU in bytes, power of two >= 4096 (4096)")
    p.add_argument("--ring-entries", type=_TYPES["--ring-entries"], metavar="E",
                   help="dirty ring size in 16-byte entries (256)")
    p.add_argument("--pages", type=_TYPES["--pages"], metavar="P",
                   help="distinct pages each vCPU writes (1000)")
    p.add_argument("--passes", type=_TYPES["--passes"], metavar="N",
                   help="walk the pages N times, then halt (1)")
    p.add_argument("--duration", type=_TYPES["--duration"], metavar="S",
                   help="keep walking for S seconds (per VM cycle) instead of --passes")
    p.add_argument("--pattern", metavar="|".join(PATTERNS),
                   help="page visit order: seq, random (see --seed) or hot (skewed repeats)")
    p.add_argument("--seed", type=_TYPES["--seed"], help="seed for random and hot (0)")
    p.add_argument("--replay", metavar="FILE",
                   help="dirty, per vCPU, the (slot, offset) sequence each ring of FILE "
                   "pushed (a recording, tracefs or perf script text): one vCPU per ring, "
                   "harvest+reset where FILE reset the ring; ring size from FILE unless "
                   "given")
    p.add_argument("--exit-every", type=_TYPES["--exit-every"], default=1, metavar="K",
                   help="I/O exit after every K page writes; 0 = tight loop, no exits (1)")
    p.add_argument("--harvest", default="on-full", metavar="|".join(HARVEST_MODES),
                   help="who harvests: vCPU on exit 31, a reaper thread too, or only it")
    p.add_argument("--reaper-ms", type=_TYPES["--reaper-ms"], default=10.0, metavar="MS",
                   help="reaper period for --harvest reaper/lazy (10)")
    p.add_argument("--harvest-delay-us", type=_TYPES["--harvest-delay-us"], default=0.0,
                   metavar="US",
                   help="injected delay before each harvest (0)")
    p.add_argument("--start-delay-ms", type=_TYPES["--start-delay-ms"], default=0.0, metavar="MS",
                   help="sleep before creating the VM, so a tracer can attach (0)")
    p.add_argument("--vms", type=_TYPES["--vms"], default=1, metavar="N",
                   help="VMs in this process, run together, each with --vcpus vCPUs (1)")
    p.add_argument("--vm-cycles", type=_TYPES["--vm-cycles"], default=1, metavar="K",
                   help="close and recreate the VMs K times (same fd numbers) (1)")
    p.add_argument("--migrate-ms", type=_TYPES["--migrate-ms"], metavar="MS",
                   help="re-pin every vCPU thread to another CPU every MS ms")
    p.add_argument("--interrupt-resets", action="store_true",
                   help="signal the harvesting thread inside KVM_RESET_DIRTY_RINGS so "
                   "calls are cut short (they are retried; see reset_eintr)")
    p.add_argument("--name", metavar="NAME",
                   help="the VM's name, as QEMU's -name guest=NAME (shown by top, kept by "
                        "record)")
    p.add_argument("--pid-file", metavar="PATH", help="write this process's pid here first")
    p.add_argument("--progress-ms", type=_TYPES["--progress-ms"], metavar="MS",
                   help="every MS ms, one JSON line on stderr: per ring the entries "
                   "harvested so far and the vCPU thread's CPU ns (for rate windows)")
    add_json(p, "print one JSON object at the end")
    p.add_argument("--dump-harvest", metavar="FILE",
                   help="write every harvested [slot, offset] per ring as JSON")


def load_trace(path: str) -> TracePlan:
    """Read ``path`` (any trace :func:`~kvmtrace.source.detect.open_source` opens) into a
    replay plan; warns on stderr when the trace itself dropped events."""
    src = open_source(path)
    try:
        plan = plan_from_source(src, "stdin" if path == "-" else path)
        if src.lost:
            print(f"kvmtrace workload: warning: {path} has {src.lost} lost events (dropped "
                  "by its tracer): the replay dirties only the pushes the trace holds",
                  file=sys.stderr)
    finally:
        src.close()
    return plan


def config_from_args(args: argparse.Namespace) -> WorkloadConfig:
    """Translate parsed flags into a WorkloadConfig (validated later by run_workload)."""
    trace = None
    if args.replay is not None:
        given = [f for f, v in (("--vcpus", args.vcpus), ("--pages", args.pages),
                                ("--pattern", args.pattern), ("--seed", args.seed))
                 if v is not None]
        if given:
            raise UsageError(f"--replay takes the vCPUs and pages from the trace; drop "
                             f"{' '.join(given)}")
        trace = load_trace(args.replay)
    if args.ring_entries is not None and args.ring_bytes is not None:
        raise UsageError("--ring-bytes and --ring-entries are exclusive", "give only one")
    if args.passes is not None and args.duration is not None:
        raise UsageError("--passes and --duration are exclusive", "give only one")
    if args.ring_entries is not None:
        if args.ring_entries < 1:
            raise UsageError(f"--ring-entries {args.ring_entries} must be positive")
        ring_bytes = bytes_from_entries(args.ring_entries)
    elif args.ring_bytes is not None:
        ring_bytes = args.ring_bytes
    elif trace is not None and trace.ring_entries:
        ring_bytes = bytes_from_entries(trace.ring_entries)
    else:
        ring_bytes = 4096
    return WorkloadConfig(
        vcpus=len(trace.rings) if trace else 1 if args.vcpus is None else args.vcpus,
        ring_bytes=ring_bytes, pages=1000 if args.pages is None else args.pages,
        passes=1 if args.passes is None else args.passes, duration_s=args.duration,
        pattern=args.pattern or "seq", seed=args.seed or 0, trace=trace,
        exit_every=args.exit_every, harvest=args.harvest, reaper_ms=args.reaper_ms,
        harvest_delay_us=args.harvest_delay_us, start_delay_ms=args.start_delay_ms,
        keep_harvest=bool(args.dump_harvest), vms=args.vms, vm_cycles=args.vm_cycles,
        migrate_ms=args.migrate_ms, interrupt_resets=args.interrupt_resets, name=args.name,
        progress_ms=args.progress_ms)



def run(args: argparse.Namespace) -> int:
    # outputs first (before a trace is read or the guest runs): not a symlink, a directory,
    # the other output or the --replay trace
    replay = [args.replay] if args.replay and args.replay != "-" else []
    if args.pid_file:
        check_output(args.pid_file, replay, flag="--pid-file")
    if args.dump_harvest:
        check_output(args.dump_harvest, [*replay, *([args.pid_file] if args.pid_file else [])],
                     flag="--dump-harvest")
    config = config_from_args(args)
    config.validate()
    if args.pid_file:
        with atomic_output(args.pid_file, flag="--pid-file", text=True,
                           fsync=False) as out:
            out.file.write(f"{os.getpid()}\n")
    result = run_workload(config)
    if args.dump_harvest:
        with atomic_output(args.dump_harvest, flag="--dump-harvest", text=True) as out:
            json.dump(result.harvest_dump(), out.file)
    print(result.to_json() if args.json else result.summary())
    sys.stdout.flush()
    return 0
