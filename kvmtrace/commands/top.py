"""``kvmtrace top``: per-ring view of the dirty ring, interactive, batch (text or NDJSON) or
as a Prometheus exporter. The data comes from one SnapshotSource: the live in-kernel maps
(:class:`kvmtrace.bpf.snapshot_source.LiveSource`) or, with ``--replay FILE``, an
:class:`~kvmtrace.analysis.aggregate.ReplaySource` over any recording or imported trace
(a large recording's rings counted in several processes:
:mod:`kvmtrace.analysis.spread_snapshots`, ``-j``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..analysis.rates import compute_interval
from ..core.counters import Snapshot
from ..core.sources import SnapshotSource, SourceMeta
from ..errors import UsageError
from ..host.child import PausedChild, check_command, exit_status
from ..views.top_render import SORT_KEYS, render_top
from .args import (
    HOOKS,
    PID_MAX_LIMIT,
    add_command,
    add_jobs,
    add_json,
    add_no_cache,
    add_pid,
    add_ring_size,
    add_skip_damaged,
    add_subcommand,
    apply_no_cache,
    check_pid,
    command_of,
    pid_value,
)

__all__ = ["register", "run", "TopOptions", "parse_options"]

EXAMPLES = """examples:
  kvmtrace top                          # interactive (h: help, q: quit)
  kvmtrace top -p 4321 -d 2             # one VMM process, refresh every 2 s
  kvmtrace top -b -n 5 -d 1 --json      # 5 NDJSON lines, one per second, for scripts
  kvmtrace top --light                  # no per-push probe: for production push rates
  kvmtrace top --prometheus :9877       # metrics on http://127.0.0.1:9877/metrics
  kvmtrace top -b --replay run.kvt      # the same view over a recording, as fast as it goes
  kvmtrace top -b --replay big.kvt -j 1 # ... in one process (default: the idle CPUs)
  kvmtrace top -b -n 3 --hist           # each interval's table, then its stall/reset histograms
  kvmtrace top -- kvmtrace workload --vcpus 2 --duration 30   # watch one command's VMs

exit status: 0; with -- COMMAND, the command's own status when it failed; 2 bad flags
"""
LONG_RUN_S = 10.0  # batch runs at least this long say how to end them


@dataclass
class TopOptions:
    """Validated ``top`` arguments."""

    pid: int = 0
    delay: float = 1.0
    count: int | None = None
    batch: bool = False
    json: bool = False
    sort: str = "push"
    prometheus: tuple[str, int] | None = None
    replay: str | None = None
    ring_entries: int | None = None
    ring_bytes: int | None = None
    skip_damaged: bool = False
    hook: str = "auto"
    light: bool = False
    hist: bool = False  # batch text: histograms of stall time and reset latency per interval
    jobs: int | None = None  # --replay: processes counting the rings (None: the idle CPUs)
    command: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "top",
        help="live per-ring view of the dirty ring (like top)",
        description="One row per dirty ring (vCPU) and a total per VM: size, used and fill, "
        "max used, pushes/s, soft-full exits/s, stall p99, resets/s, entries per reset, "
        "reset p99, lost pages (overwritten + stranded). Interactive, batch (-b, text or "
        "--json) or Prometheus.",
        epilog=EXAMPLES, run=run,
    )
    # Values are parsed in parse_options() so a bad one is a single error line (exit 2).
    add_pid(p, typed=False)
    p.add_argument("-d", "--delay", default="1", metavar="SECS", help="refresh interval (1)")
    p.add_argument("-n", "--iterations", metavar="COUNT", help="stop after COUNT refreshes")
    p.add_argument("-b", "--batch", action="store_true", help="print instead of curses")
    add_json(p, "batch NDJSON, one object per interval")
    p.add_argument("-s", "--sort", default="push", metavar="KEY",
                   help=f"sort column: {', '.join(SORT_KEYS)} (push); lost = lost pages")
    p.add_argument("--prometheus", metavar="ADDR:PORT",
                   help="serve /metrics (':PORT' = 127.0.0.1)")
    p.add_argument("--replay", metavar="FILE", help="a recording or ftrace/perf-script text")
    add_ring_size(p, "ring size for --replay text traces", "ring size in bytes, ditto",
                  typed=False)
    add_skip_damaged(p)
    add_jobs(p, "--replay: count a recording's rings in N processes (1: this one; "
                "default: the CPUs this process may use that are idle now, for recordings of "
                "16 M events and more); the same output")
    p.add_argument("--hook", default="auto", metavar="KIND", help="auto|raw_tp|tp (auto)")
    add_no_cache(p)
    p.add_argument("--light", action="store_true",
                   help="no probe on every push (cost independent of the push rate): "
                   "pushes, used, max used and lost pages are updated at each ring's resets "
                   "only (the JSON says \"mode\": \"light\"); rings of VMs older than "
                   "top count pushes from their first reset seen")
    p.add_argument("--hist", action="store_true",
                   help="batch text: after each interval's table, log2 histograms of its "
                   "stall time and reset latency (interactive: key H)")
    add_command(p, "run COMMAND, show only its VMs, stop (batch) when it exits; its "
                "output goes to stderr in batch mode and is shown after the view ends")


def _int(value: str | None, flag: str, low: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value, 0)
    except ValueError:
        n = low - 1
    if n < low:
        raise UsageError(f"bad {flag} {value!r}", f"give an integer >= {low}")
    return n


def parse_options(args: argparse.Namespace) -> TopOptions:
    """Check every value; raise UsageError (one line, exit 2) on the first bad one."""
    from ..views.prometheus import parse_listen

    try:
        delay = float(args.delay)
    except ValueError:
        delay = -1.0
    low = 1e-6 if args.replay else 0.01  # a file's time can be stepped finely
    if not low <= delay <= 86400:
        raise UsageError(f"bad -d {args.delay!r}", f"give seconds between {low:g} and 86400")
    if args.sort not in SORT_KEYS:
        raise UsageError(f"unknown sort key {args.sort!r}", f"use one of {', '.join(SORT_KEYS)}")
    if args.hook not in HOOKS:
        raise UsageError(f"unknown --hook {args.hook!r}", "use auto, raw_tp or tp")
    apply_no_cache(args)
    if args.pid is None:
        pid = 0
    elif args.replay:  # a pid of the file's host, whose pid_max may be larger
        pid = _int(args.pid, "-p", 1) or 0
        if pid > PID_MAX_LIMIT:
            raise UsageError(f"bad -p {args.pid!r}", f"give a process id up to {PID_MAX_LIMIT}")
    else:
        try:
            pid = pid_value(args.pid)
        except argparse.ArgumentTypeError as err:
            message, _, fix = str(err).partition(" (fix: ")
            raise UsageError(message, fix.removesuffix(")")) from None
    opts = TopOptions(
        pid=pid,
        delay=delay,
        count=_int(args.iterations, "-n", 1),
        batch=bool(args.batch or args.json),
        json=bool(args.json),
        sort=args.sort,
        prometheus=parse_listen(args.prometheus) if args.prometheus else None,
        replay=args.replay,
        ring_entries=_int(args.ring_entries, "--ring-entries", 1),
        ring_bytes=_int(args.ring_bytes, "--ring-bytes", 16),
        skip_damaged=bool(args.skip_damaged),
        hook=args.hook,
        light=bool(args.light),
        hist=bool(args.hist),
        jobs=args.jobs,
    )
    if opts.hist and (opts.json or not opts.batch):
        raise UsageError("--hist draws text in batch mode (-b)",
                         "use -b --hist; the JSON has stall_hist; interactively press H")
    if opts.light and opts.replay:
        raise UsageError("--light only applies to the live view",
                         "drop --light: a replay reads every recorded event anyway")
    command = command_of(args)
    if command and (opts.replay or opts.pid):
        raise UsageError("-- COMMAND cannot be combined with --replay or -p",
                         "top -- COMMAND follows COMMAND's own process")
    opts.command = command
    if command:
        check_command(command)
    if not opts.replay:
        check_pid(opts.pid)
    if opts.skip_damaged and not opts.replay:
        raise UsageError("--skip-damaged only applies to --replay",
                         "give --replay FILE, or drop --skip-damaged")
    if opts.jobs is not None and not opts.replay:
        raise UsageError("-j/--jobs only applies to --replay",
                         "give --replay FILE, or drop -j (the live view reads the kernel's maps)")
    if (opts.ring_entries or opts.ring_bytes) and not opts.replay:
        raise UsageError("--ring-entries/--ring-bytes only apply to --replay",
                         "the live view learns ring sizes from KVM_ENABLE_CAP")
    return opts


class _Latest(SnapshotSource):
    """SnapshotSource handing out the last snapshot the main loop took (Prometheus next to a
    replay or a batch loop: one reader of the source, scrapes see what the loop printed)."""

    def __init__(self, meta: SourceMeta, snap: Snapshot) -> None:
        self.meta = meta
        self.snap = snap

    def snapshot(self) -> Snapshot:
        return self.snap


def _open(opts: TopOptions, child: PausedChild | None = None) -> tuple[SnapshotSource, str]:
    if opts.replay:
        from ..analysis.spread_snapshots import open_replay
        from ..source.detect import open_source

        events = open_source(opts.replay, ring_entries=opts.ring_entries,
                             ring_bytes=opts.ring_bytes, skip_damaged=opts.skip_damaged)
        # what each process skipped is known to it alone: --skip-damaged is one process
        jobs = 1 if opts.skip_damaged else opts.jobs
        replay = open_replay(events, int(opts.delay * 1e9), pid=opts.pid, jobs=jobs,
                             min_events=0 if opts.jobs is not None else None)
        for w in replay.warnings:  # text rings not all told apart; damage skipped
            print(f"kvmtrace top: warning: {w}", file=sys.stderr)
        return replay, "replay"
    from ..bpf.loader import Probes, preflight
    from ..bpf.snapshot_source import LiveSource

    preflight()
    probes = Probes("top-light" if opts.light else "top",
                    pid=child.pid if child else opts.pid, hook=opts.hook,
                    follow=child is not None)  # -- COMMAND: its whole process tree
    if child is not None:  # keep its rows after it exits: the final state stays on screen
        return LiveSource(probes=probes), "live"
    try:  # notice VMMs exiting (process connector), so their rows go away
        return LiveSource(probes=probes, watch=True), "live"
    except (OSError, ImportError):
        return LiveSource(probes=probes), "live"


def _clock(label: str) -> Callable[[Snapshot], str]:
    """Title clock: wall time live; for a file, time since the file's first snapshot."""
    if label == "live":
        return lambda snap: time.strftime("%H:%M:%S")
    t0: list[int] = []

    def since_start(snap: Snapshot) -> str:
        if not t0:
            t0.append(snap.time_ns)
        return f"t+{(snap.time_ns - t0[0]) / 1e9:.3f}s"

    return since_start


def _wall(source: SnapshotSource, label: str, first: Snapshot, snap: Snapshot) -> float | None:
    if label == "live":
        return time.time()
    start = source.meta.start_time
    return None if start is None else start + (snap.time_ns - first.time_ns) / 1e9


def _batch(opts: TopOptions, source: SnapshotSource, label: str, lock: threading.Lock,
           latest: _Latest | None, *, emit: bool = True, child: PausedChild | None = None
           ) -> int:
    """Take a snapshot every ``opts.delay`` s (a replay without a server: as fast as it
    goes), print each interval (NDJSON or text) when ``emit``, publish it to ``latest``.
    With ``child``, the interval in which it exits is the last one."""
    from ..views.topjson import interval_json

    replay = label == "replay"
    width = shutil.get_terminal_size((80, 24)).columns if sys.stdout.isatty() else 80
    if latest is not None:
        first = latest.snap
    else:
        with lock:
            first = source.snapshot()
    prev = first
    clock = _clock(label)
    clock(first)
    hooks = dict(source.meta.hooks)
    mode = str(source.meta.extra.get("mode", "full"))
    due = time.monotonic()
    done = 0
    below = None
    probes = getattr(source, "probes", None)
    if child is not None and probes is not None and not probes.follow:
        from ..bpf.vmident import VmmsBelow  # a VMM below COMMAND that is not followed

        below = VmmsBelow(child.pid)
    seen = False  # a ring of the child's own pid
    said = len(getattr(source, "warnings", [])) if replay else 0  # printed at open
    while opts.count is None or done < opts.count:
        if not replay or latest is not None:
            due += opts.delay
            while child is not None and child.poll() is None and time.monotonic() < due:
                time.sleep(min(0.05, max(0.0, due - time.monotonic())))
            time.sleep(max(0.0, due - time.monotonic()) if child is None else 0.0)
        exited = child is not None and child.poll() is not None
        with lock:
            cur = source.snapshot()
        if latest is not None:
            latest.snap = cur
        if below is not None:
            below.watch()
            seen = seen or any(k.pid == below.pid for k in cur.rings)
        iv = compute_interval(prev, cur, pid=opts.pid)
        if emit and opts.json:
            obj = interval_json(iv, wall_time=_wall(source, label, first, cur), mode=mode)
            print(json.dumps(obj, separators=(",", ":")), flush=True)
        elif emit:
            lines = render_top(iv, width, None, opts.sort, clock=clock(cur),
                               source=label, hooks=hooks, pid=opts.pid, mode=mode)
            if opts.hist:
                from ..views.top_hist import top_hist_lines

                lines += ["", *top_hist_lines(iv, width)]
            print("\n".join(lines) + "\n", flush=True)
        prev = cur
        done += 1
        if exited or (replay and source.done):
            break
    warning = below.warning("top", "saw no ring") if below is not None and not seen else None
    if warning:
        print(warning, file=sys.stderr)
    for w in getattr(source, "warnings", [])[said:] if replay else []:
        print(f"kvmtrace top: warning: {w}", file=sys.stderr)  # damage met while reading
    return 0


def _serve_only(opts: TopOptions, source: SnapshotSource, label: str,
                lock: threading.Lock, latest: _Latest | None) -> int:
    """Prometheus alone: scrapes read the live source; a replay plays in real time."""
    if latest is not None:
        _batch(opts, source, label, lock, latest, emit=False)
    while True:  # until Ctrl-C / SIGTERM (a replay keeps serving its final state)
        time.sleep(3600)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    opts = parse_options(args)
    if not opts.batch and not opts.prometheus and not sys.stdout.isatty():
        raise UsageError("the interactive view needs a terminal",
                         "use -b for batch text, or -b --json for scripts")
    child = captured = None
    if opts.command:
        if opts.batch:
            child = PausedChild(opts.command, stdout=sys.stderr.fileno())
        else:  # the screen is ours: keep its output until the view ends
            captured = tempfile.TemporaryFile()
            child = PausedChild(opts.command, stdout=captured, stderr=captured)
    try:
        source, label = _open(opts, child)
    except BaseException:
        if child is not None:
            child.stop(kill=True)
        raise
    if child is not None:
        child.release()
    lock = threading.Lock()
    exporter = None
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)  # end cleanly, tty restored
    old_int = signal.getsignal(signal.SIGINT)
    try:
        unbounded = opts.count is None or opts.count * opts.delay >= LONG_RUN_S
        latest = None
        if opts.prometheus:
            from ..views.prometheus import Exporter

            if label == "replay" or opts.batch:  # serve what the loop read last
                with lock:
                    latest = _Latest(source.meta, source.snapshot())
            exporter = Exporter(latest or source, *opts.prometheus, lock=lock)
            host, port = exporter.address
            where = f"[{host}]" if ":" in host else host
            print(f"kvmtrace top: serving http://{where}:{port}/metrics", file=sys.stderr,
                  flush=True)
            exporter.start()
        if (opts.batch or opts.prometheus) and label == "live" and unbounded and not child:
            print("Hit Ctrl-C to end.", file=sys.stderr, flush=True)
        if opts.batch:
            status = _batch(opts, source, label, lock, latest, child=child)
            return _command_status(child) if child is not None else status
        if opts.prometheus:
            return _serve_only(opts, source, label, lock, latest)
        from ..views.top_curses import TopState, run_curses

        status = run_curses(
            source,
            opts.delay,
            state=TopState(sort_key=opts.sort, pid=opts.pid),
            source_label=label,
            hooks=dict(source.meta.hooks),
            clock=_clock(label),
            end_status=lambda: _end_status(source, child),
            count=opts.count,
            mode=str(source.meta.extra.get("mode", "full")),
        )
        return _command_status(child) if child is not None else status
    except KeyboardInterrupt:
        return 0
    finally:
        # a second Ctrl-C or SIGTERM must not cut the detach short (bcc would then detach
        # again at exit, from a half-closed state, with a traceback): closing is bounded
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if exporter is not None:
            exporter.close()
        _close(source)
        if child is not None:
            child.stop()
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        if captured is not None:
            captured.seek(0)
            sys.stdout.flush()
            shutil.copyfileobj(captured, sys.stdout.buffer)
            sys.stdout.flush()


def _command_status(child: PausedChild) -> int:
    """COMMAND's failure status if it ended by itself (exit_status), else 0."""
    return exit_status(child.poll())


def _end_status(source: SnapshotSource, child: PausedChild | None) -> str | None:
    if source.done:
        return "end of file (q: quit)"
    if child is not None and child.poll() is not None:
        return f"command exited with status {child.returncode} (q: quit)"
    return None


def _close(source: SnapshotSource, timeout_s: float = 5.0) -> None:
    """Close the source without ever hanging the exit: what a close leaves undone (BPF
    links, netlink sockets) the kernel undoes when the process ends."""
    worker = threading.Thread(target=source.close, daemon=True)
    worker.start()
    worker.join(timeout_s)
