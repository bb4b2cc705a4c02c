"""``kvmtrace bench -o DIR``: run one dirty-ring scenario N times under ``record``, keep a
bundle that ``kvmtrace compare`` reads (layout: :mod:`kvmtrace.analysis.bundle`).

Each repetition is :func:`kvmtrace.commands.record.record` of ``kvmtrace workload --json
FLAGS`` (the built-in VMM in its own process, held until the probes are attached), written
to ``DIR/rep-NNN.kvt``; its :class:`~kvmtrace.analysis.bundle.RepMetrics` and the VMM's own
ground truth go to ``DIR/metrics.json``, what ran and where to ``DIR/bundle.json``, written
last (a directory without it is no bundle). Every file goes through
:mod:`kvmtrace.host.outfile` (0600, atomic). DIR must not exist or be empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..analysis.bundle import (
    BUNDLE_KIND,
    BUNDLE_SCHEMA,
    META_NAME,
    METRICS_NAME,
    METRICS_SCHEMA,
    measure,
    rep_name,
)
from ..errors import KvmtraceError, UsageError
from ..host.outfile import atomic_output
from ..vmm.workload import WorkloadConfig
from .args import HOOKS, Parser, add_subcommand, integer
from .bench_qemu import QEMU_DEFAULT_FLAGS, QemuRuns, check_qemu_config
from .record import RecordSummary

__all__ = ["register", "run", "PRESETS", "MAX_REPS", "host_facts", "workload_flags",
           "run_bench", "BenchResult"]

MAX_REPS = 1000
#: named scenarios: the ``kvmtrace workload`` flags of each (fixed page counts, so every
#: run pushes the same number of entries; each takes well under a second of guest time)
PRESETS: dict[str, tuple[str, ...]] = {
    # a 256-entry ring under a guest that exits after every page: a soft-full exit and
    # a harvest every 192 pushes
    "small-ring-heavy": ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "2000",
                         "--passes", "4", "--exit-every", "1"),
    # a 4096-entry ring, pages visited in a random order
    "large-ring-random": ("--vcpus", "2", "--ring-bytes", "65536", "--pages", "16000",
                          "--pattern", "random", "--seed", "1", "--exit-every", "16"),
    # the same load harvested by a reaper thread every 5 ms, or by the vCPU on exit 31
    "reaper": ("--vcpus", "2", "--ring-bytes", "16384", "--pages", "4000", "--passes", "4",
               "--exit-every", "16", "--harvest", "reaper", "--reaper-ms", "5"),
    "on-full": ("--vcpus", "2", "--ring-bytes", "16384", "--pages", "4000", "--passes", "4",
                "--exit-every", "16", "--harvest", "on-full"),
    # eight vCPUs (more than this host's cores) on small rings
    "many-vcpus": ("--vcpus", "8", "--ring-bytes", "4096", "--pages", "1000", "--passes",
                   "2", "--exit-every", "4"),
}
DEFAULT_PRESET = "small-ring-heavy"
#: workload flags bench sets or that would break a bundle
_FORBIDDEN = ("--json", "--pid-file", "--dump-harvest", "--help", "-h")

EPILOG = f"""presets (default {DEFAULT_PRESET}):
  {", ".join(PRESETS)}

examples:
  kvmtrace bench -o base/ --reps 5 --preset small-ring-heavy   # on kernel A
  kvmtrace bench -o cand/ --reps 5 --preset small-ring-heavy   # on kernel B
  kvmtrace compare base/ cand/                                 # exit 1: regression
  kvmtrace bench -o slow/ --reps 3 -- --vcpus 2 --harvest-delay-us 200
  kvmtrace bench -o r/ --preset reaper -- --reaper-ms 20       # one flag changed
  kvmtrace bench -o q/ --qemu --reps 3 -- --ring-entries 4096 --duration 2

--qemu: one QEMU for the bundle, on kvmtrace's multiboot guest (--vcpus,
--pages, --pattern, --seed, --exit-every, --ring-entries 1024..65536 apply),
started as
  qemu-system-x86_64 -nodefaults [-bios /usr/share/qemu/qboot.rom]
    -accel kvm,dirty-ring-size=ENTRIES -m MIB -smp VCPUS -kernel GUEST.elf
    -display none -serial none -no-reboot -qmp unix:SOCK,server=on,wait=off
    -name guest=kvmtrace-bench
each run is one QMP calc-dirty-rate (mode dirty-ring, calc-time --duration,
1 s) recorded with record -p; QEMU's own MB/s goes to metrics.json as its truth.

the flags after -- are those of kvmtrace workload (see kvmtrace workload --help),
given after the preset's, so they override it.
exit status: 0 done; 2 bad flags or DIR; 130 interrupted (the runs done so far
are kept as a bundle)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "bench",
        help="run a dirty-ring scenario N times under record; write a bundle for compare",
        description="Run the built-in VMM (kvmtrace workload) N times, each run recorded "
        "like\nkvmtrace record -- COMMAND, and write a bundle directory: the recordings, "
        "per-run\nmetrics (metrics.json) and what ran where (bundle.json: kernel, CPU, "
        "kvmtrace\nversion, scenario, time). Compare two bundles with kvmtrace compare.",
        epilog=EPILOG, run=run)
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="bundle directory to create (must not exist, or be empty)")
    p.add_argument("--reps", type=integer("--reps", 1, MAX_REPS, example="5"), default=5,
                   metavar="N", help="runs (default 5)")
    p.add_argument("--preset", choices=tuple(PRESETS), metavar="NAME",
                   help=f"named scenario: {', '.join(PRESETS)}")
    p.add_argument("--qemu", action="store_true",
                   help="run the scenario on QEMU (one QEMU, each run one calc-dirty-rate "
                   "of --duration S, 1 s by default; QEMU's command line below)")
    p.add_argument("--hook", choices=HOOKS, default="auto",
                   help="raw tracepoints or tracepoints (default: best available)")
    p.add_argument("workload", nargs=argparse.REMAINDER, metavar="-- WORKLOAD FLAGS",
                   help="kvmtrace workload flags (after the preset's)")


def workload_flags(preset: str | None, extra: list[str], *, qemu: bool = False
                   ) -> tuple[str | None, list[str], WorkloadConfig]:
    """The preset's name (the default one when neither is given; with ``qemu`` QEMU's
    default flags instead), the workload flags and their config, checked by workload's own
    parser (UsageError or its one-line exit 2 when bad)."""
    extra = extra[1:] if extra[:1] == ["--"] else list(extra)
    bad = [f for f in extra if f.split("=", 1)[0] in _FORBIDDEN]
    if bad:
        raise UsageError(f"workload flag {bad[0]} cannot be given to bench",
                         "bench sets the workload's output itself; drop it")
    base: tuple[str, ...] = ()
    if preset is not None:
        base = PRESETS[preset]
    elif not extra:
        preset, base = (None, QEMU_DEFAULT_FLAGS) if qemu else (DEFAULT_PRESET,
                                                                  PRESETS[DEFAULT_PRESET])
    flags = [*base, *extra]
    from . import workload

    parser = Parser(prog="kvmtrace bench")
    workload.register(parser.add_subparsers())
    args = parser.parse_args(["workload", *flags])
    cfg = workload.config_from_args(args)
    cfg.validate()
    return preset, flags, cfg


def _first_line(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def host_facts() -> dict[str, Any]:
    """Where the bundle was made: kernel release, version and command line, CPU model and
    count, load average (the figures mean less on a loaded host), Python."""
    u = os.uname()
    try:
        cmdline = Path("/proc/cmdline").read_text().strip()
    except OSError:
        cmdline = None
    return {"kernel": {"release": u.release, "version": u.version, "cmdline": cmdline,
                       "machine": u.machine},
            "cpu_model": _first_line("/proc/cpuinfo", "model name"),
            "cpus": os.cpu_count(), "hostname": u.nodename,
            "loadavg": list(os.getloadavg()), "python": platform.python_version()}


@dataclasses.dataclass
class BenchResult:
    """What :func:`run_bench` wrote: the bundle directory, runs done, and whether Ctrl-C
    (or SIGTERM) ended it early."""

    path: Path
    reps: int
    interrupted: bool


def _truth(stdout: bytes) -> dict[str, Any] | None:
    """The workload's --json object: its per-ring counts, the ground truth."""
    try:
        obj = json.loads(stdout.decode(errors="replace").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return obj if isinstance(obj, dict) else None


def _make_dir(path: str) -> Path:
    out = Path(path)
    if out.is_symlink():
        raise UsageError(f"-o {out} is a symlink: kvmtrace does not write through one",
                         "give the real path")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"-o {out} exists and is not a directory",
                             "give a new directory name")
        if any(out.iterdir()):
            raise UsageError(f"-o {out} is not empty: a bundle is never written over",
                             "give a new directory, or remove the old bundle first")
        return out
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: directory {out.parent} does not exist",
                         "create it or pick another path")
    try:
        out.mkdir(mode=0o700)
    except OSError as err:
        raise UsageError(f"cannot create -o {out}: {err.strerror}",
                         "give a writable path") from None
    return out


def _write_json(path: Path, obj: Any) -> None:
    with atomic_output(path, flag="-o", text=True) as out:
        json.dump(obj, out.file, indent=1, allow_nan=False)
        out.file.write("\n")


def _workload_run(path: Path, command: list[str], hook: str
                  ) -> tuple[RecordSummary | None, dict[str, Any] | None]:
    """One run of the built-in VMM under record: (summary, the VMM's --json), or (None,
    None) when Ctrl-C/SIGTERM ended it."""
    from .record import record

    with tempfile.TemporaryFile() as child_out:
        summary = record(path, command=command, hook=hook, quiet=True, stdout=child_out)
        child_out.seek(0)
        truth = _truth(child_out.read())
    if summary.child_status is None or summary.child_status < 0:
        return None, None  # Ctrl-C/SIGTERM stopped record and the workload
    if summary.child_status:
        raise KvmtraceError(f"{path.name}: kvmtrace workload exited with status "
                            f"{summary.child_status}",
                            "run kvmtrace workload with these flags to see why")
    return summary, truth


def _qemu_run(path: Path, qemu: QemuRuns, hook: str
              ) -> tuple[RecordSummary | None, dict[str, Any] | None]:
    """One calc-dirty-rate of QEMU under record -p: (summary, QEMU's answer)."""
    from .record import record

    answer: dict[str, Any] = {}
    duration = qemu.seconds + 2.0
    thread = qemu.calc_while(path, answer)
    summary = record(path, pid=qemu.pid, duration=duration, hook=hook, quiet=True)
    thread.join(qemu.seconds + 35)
    if summary.seconds < duration:
        return None, None  # Ctrl-C/SIGTERM stopped record before its time
    if "error" in answer or "qemu" not in answer:
        raise KvmtraceError(f"{path.name}: QMP calc-dirty-rate failed: "
                            f"{answer.get('error', 'no answer')}",
                            "run the QEMU command line of kvmtrace bench --help by hand")
    return summary, answer["qemu"]


def run_bench(out: Path, flags: list[str], reps: int, *, preset: str | None = None,
              hook: str = "auto", progress: bool = True,
              qemu: QemuRuns | None = None) -> BenchResult:
    """Record ``reps`` runs of ``kvmtrace workload --json FLAGS`` (or, with ``qemu``, of
    QEMU's calc-dirty-rate) into the existing empty directory ``out``; write metrics.json
    and bundle.json (also after an interruption, with the runs done, unless none was)."""
    from ..source.recording import open_recording

    command = [sys.executable, "-m", "kvmtrace", "workload", "--json", *flags]
    meta: dict[str, Any] = {
        "schema": BUNDLE_SCHEMA, "kind": BUNDLE_KIND, "kvmtrace_version": __version__,
        "vmm": "kvmtrace workload", "preset": preset, "workload_args": flags,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **host_facts()}
    if qemu is not None:
        meta.update(vmm="qemu", qemu_version=qemu.version, qemu_argv=qemu.argv,
                    calc_time_s=qemu.seconds)
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    interrupted = False
    for rep in range(1, reps + 1):
        path = out / rep_name(rep)
        try:
            summary, truth = (_workload_run(path, command, hook) if qemu is None
                              else _qemu_run(path, qemu, hook))
        except KeyboardInterrupt:  # Ctrl-C outside record's own handler
            summary = truth = None
        if summary is None:
            interrupted = True
            path.unlink(missing_ok=True)
            break
        src = open_recording(path)
        try:
            _, metrics = measure(src, path.name)
        finally:
            src.close()
        names.append(path.name)
        rows.append({"rep": rep, **metrics.to_dict(),
                     "record": {"events": summary.events, "lost_events": summary.lost,
                                "bytes": summary.bytes, "seconds": summary.seconds},
                     "truth": truth})
        if progress:
            stall = metrics.stall_ns.get("p50")
            print(f"kvmtrace bench: run {rep}/{reps}: {metrics.pushes} pushes, "
                  f"{metrics.dirty_mbps or 0:.1f} MB/s, stall p50 "
                  f"{'-' if stall is None else f'{stall / 1e3:.1f} us'}"
                  + (f", anomalies {', '.join(sorted(metrics.anomalies))}"
                     if metrics.anomalies else ""), file=sys.stderr)
    if names:
        meta.update(reps=len(names), recordings=names, interrupted=interrupted,
                    finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _write_json(out / METRICS_NAME, {"schema": METRICS_SCHEMA, "reps": rows})
        _write_json(out / META_NAME, meta)
    return BenchResult(out, len(names), interrupted)


def run(args: argparse.Namespace) -> int:
    preset, flags, cfg = workload_flags(args.preset, list(args.workload or []),
                                        qemu=args.qemu)
    qemu = QemuRuns(cfg, check_qemu_config(cfg)) if args.qemu else None
    out = _make_dir(args.output)
    try:
        if qemu is not None:
            qemu.start()
        result = run_bench(out, flags, args.reps, preset=preset, hook=args.hook, qemu=qemu)
    finally:
        if qemu is not None:
            qemu.close()
    if result.interrupted:
        print(f"kvmtrace bench: interrupted after {result.reps} run(s)"
              + (f"; {out} holds them" if result.reps else ""), file=sys.stderr)
        return 130
    print(f"kvmtrace bench: {result.reps} run(s) in {out}; compare with: "
          f"kvmtrace compare BASE {out}", file=sys.stderr)
    return 0
