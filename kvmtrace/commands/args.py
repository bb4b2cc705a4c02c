"""Argument helpers shared by the subcommands.

Every subcommand module registers its parser with :func:`add_subcommand` and adds the
options it shares with others through the helpers here, so one option reads and behaves
the same in every command that has it: the input file, ``--json``, the ring size of a
trace that does not say (``--ring-entries``/``--ring-bytes``, 16-byte
``struct kvm_dirty_gfn`` entries or bytes as given to ``KVM_ENABLE_CAP``), ``-p PID``,
``--hook`` and ``-- COMMAND``. Where commands word an option differently for their own
context, the helper takes that command's help text. Values the library checks (ring
sizes, hooks) are checked there, so a bad one is one ``UsageError`` line.

Every flag is checked before anything happens (no file written, no BPF compiled, no
``-- COMMAND`` started): :class:`Parser` makes argparse's own errors one line with the fix
(exit 2), and the value types here (:func:`number`, :func:`integer`, :func:`pid_value`)
refuse NaN, infinities, and values out of their range while the command line is parsed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from typing import NoReturn

from ..core.kvm_abi import GFN_BYTES, KVM_DIRTY_RING_MAX_ENTRIES, MIN_RING_BYTES, MIN_RING_ENTRIES
from ..errors import UsageError

__all__ = ["HOOKS", "Parser", "add_subcommand", "add_input", "add_json", "add_ring_size",
           "add_pid", "add_skip_damaged", "add_command", "command_of", "number", "integer",
           "pid_max", "PID_MAX_LIMIT", "pid_value", "check_pid", "MAX_SECONDS",
           "add_progress", "add_no_cache", "apply_no_cache", "add_jobs", "jobs_of"]

#: the longest duration or interval any flag takes (a year, in seconds)
MAX_SECONDS = 366 * 86400.0

# argparse's own messages -> what to do about them
_FIXES = (
    ("invalid int value", "give a whole number"),
    ("invalid float value", "give a number"),
    ("invalid choice", "pick one of the choices listed"),
    ("the following arguments are required", "add them"),
    ("unrecognized arguments", "drop them, or put a command after --"),
    ("expected one argument", "give the flag a value"),
    ("not allowed with argument", "give only one of them"),
    ("one of the arguments", "give one of them"),
    ("ambiguous option", "spell the flag out"),
)


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line with the fix, exit status 2 (argparse
    prints the usage, several lines, and no fix)."""

    def error(self, message: str) -> NoReturn:
        if "(fix:" in message:  # a type of this module: the message names flag and value
            message = re.sub(r"^argument [^:]*: ", "", message)
        else:
            fix = next((f for key, f in _FIXES if key in message), "")
            message += f" (fix: {fix + '; ' if fix else ''}see {self.prog} --help)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_number(text: str, integral: bool) -> float | int | None:
    try:
        return int(text, 0) if integral else float(text)
    except ValueError:
        return None


def number(flag: str, low: float, high: float, *, low_open: bool = False,
           example: str = "1") -> Callable[[str], float]:
    """argparse type of ``flag``: a finite float in [low, high] (``low_open``: above low)."""

    def parse(text: str) -> float:
        value = _parse_number(text, False)
        ok = value is not None and math.isfinite(value) and value <= high and (
            value > low if low_open else value >= low)
        if not ok:
            above = f"above {low:g}" if low_open else f"from {low:g}"
            raise argparse.ArgumentTypeError(
                f"{flag} {text}: not a number {above} to {high:g} (fix: e.g. {flag} {example})")
        return float(value)

    return parse


def integer(flag: str, low: int, high: int, *, example: str = "1",
            power_of_two: bool = False) -> Callable[[str], int]:
    """argparse type of ``flag``: an integer in [low, high] (decimal or 0x...), optionally a
    power of two."""

    def parse(text: str) -> int:
        value = _parse_number(text, True)
        ok = value is not None and low <= value <= high and (
            not power_of_two or value & (value - 1) == 0)
        if not ok:
            kind = "a power of two" if power_of_two else "an integer"
            what = (f"above the maximum: give {kind} from {low} to {high}"
                    if value is not None and value > high else
                    f"not {kind} from {low} to {high}")
            raise argparse.ArgumentTypeError(f"{flag} {text}: {what} (fix: e.g. {flag} {example})")
        return int(value)

    return parse


#: the kernel's largest pid_max (PID_MAX_LIMIT, include/linux/threads.h, 64-bit)
PID_MAX_LIMIT = 1 << 22


def pid_max() -> int:
    """``/proc/sys/kernel/pid_max``: every pid is below it (:data:`PID_MAX_LIMIT` if
    unreadable)."""
    try:
        return int(open("/proc/sys/kernel/pid_max").read())
    except (OSError, ValueError):
        return PID_MAX_LIMIT


def pid_value(text: str) -> int:
    """argparse type of ``-p``: a process id, 1 to pid_max - 1 (ArgumentTypeError naming
    the fix otherwise)."""
    top = pid_max() - 1
    value = _parse_number(text, True)
    if value is None or not 1 <= value <= top:
        raise argparse.ArgumentTypeError(
            f"-p {text}: not a process id from 1 to {top} (fix: give the VMM's pid, e.g. "
            "from pgrep qemu, or leave -p out for every process)")
    return int(value)


def check_pid(pid: int, flag: str = "-p") -> None:
    """UsageError unless process ``pid`` exists now (0: no filter, always fine)."""
    if pid and not os.path.isdir(f"/proc/{pid}"):
        raise UsageError(f"{flag} {pid}: no such process",
                         "give the pid of a running VMM (pgrep -a qemu), or leave -p out")

#: ``--hook`` values: the best available, raw tracepoints, tracepoints
HOOKS = ("auto", "raw_tp", "tp")


def add_subcommand(sub: argparse._SubParsersAction, name: str, *, help: str,  # noqa: A002
                   description: str, epilog: str, run: Callable[[argparse.Namespace], int]
                   ) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: its one-line ``help`` in ``kvmtrace --help``, its
    ``description`` and ``epilog`` (examples) kept as written, ``run(args)`` as its body."""
    p = sub.add_parser(name, help=help, description=description, epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=run)
    return p


def add_input(p: argparse.ArgumentParser, help: str, name: str = "file") -> None:  # noqa: A002
    """A trace to read: a recording, tracefs text or ``perf script`` text (detected)."""
    p.add_argument(name, help=help)


def add_json(p: argparse.ArgumentParser,
             help: str = "print one JSON object (schema 1)") -> None:  # noqa: A002
    p.add_argument("--json", action="store_true", help=help)


def add_progress(p: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bar on stderr (there is one only when stderr is a
    terminal: kvmtrace.views.progress); ``args.progress`` is False with it."""
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr (shown only when stderr is a terminal)")


def add_ring_size(p: argparse.ArgumentParser, entries_help: str, bytes_help: str | None = None,
                  *, typed: bool = True, entries_metavar: str = "N") -> None:
    """``--ring-entries N`` and (unless ``bytes_help`` is None) ``--ring-bytes B``: the ring
    size where the input does not say. ``typed=False`` keeps the strings for the command
    to check (one error line naming the flag and the values it takes)."""
    entries = integer("--ring-entries", MIN_RING_ENTRIES, KVM_DIRTY_RING_MAX_ENTRIES,
                      power_of_two=True, example="4096") if typed else None
    p.add_argument("--ring-entries", metavar=entries_metavar, help=entries_help,
                   **({"type": entries} if typed else {}))
    if bytes_help is not None:
        size = integer("--ring-bytes", MIN_RING_BYTES, KVM_DIRTY_RING_MAX_ENTRIES * GFN_BYTES,
                       power_of_two=True, example="65536") if typed else None
        p.add_argument("--ring-bytes", metavar="B", help=bytes_help,
                       **({"type": size} if typed else {}))


MAX_JOBS = 1024


def add_jobs(p: argparse.ArgumentParser, help: str | None = None) -> None:  # noqa: A002
    """``-j/--jobs N``: processes for work spread over cores (a replay's rings)."""
    p.add_argument("-j", "--jobs", type=integer("--jobs", 1, MAX_JOBS, example="2"),
                   default=None, metavar="N",
                   help=help or "replay in N processes, rings spread over them (1: one "
                        "process; default: the CPUs this process may use that are idle now, "
                        "for inputs of 2 M events and more)")


def jobs_of(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(jobs, min_events) for :func:`kvmtrace.analysis.replay.replay_source` from
    ``--jobs``: as given (whatever the input's size), else (None, None): the idle CPUs,
    looked up (a 100 ms sample) only for an input large enough to spread."""
    if args.jobs is not None:
        return args.jobs, 0
    return None, None


def add_pid(p: argparse.ArgumentParser, *, typed: bool = True) -> None:
    """``-p PID``: only this VMM process (0 when not given = all). ``typed=False`` keeps the
    string (None when not given) for the command to check with :func:`pid_value`."""
    if typed:
        p.add_argument("-p", "--pid", type=pid_value, default=0, metavar="PID",
                       help="only this VMM process")
    else:
        p.add_argument("-p", "--pid", metavar="PID", help="only this VMM process")


def add_no_cache(p: argparse.ArgumentParser) -> None:
    """``--no-cache``: compile the probes with bcc even where the probe cache
    (kvmtrace.bpf.objcache) holds them (as ``KVMTRACE_NO_CACHE=1``)."""
    p.add_argument("--no-cache", action="store_true",
                   help="compile the probes, do not load them from the probe cache "
                   "(/var/cache/kvmtrace; also KVMTRACE_NO_CACHE=1)")


def apply_no_cache(args: argparse.Namespace) -> None:
    """Make ``--no-cache`` hold for every probe load of this process."""
    if getattr(args, "no_cache", False):
        os.environ["KVMTRACE_NO_CACHE"] = "1"


def add_skip_damaged(p: argparse.ArgumentParser) -> None:
    """``--skip-damaged``: a recording's damaged blocks in the middle of the file are
    skipped and counted (a warning with their offsets) instead of a format error."""
    p.add_argument("--skip-damaged", action="store_true",
                   help="recordings: skip damaged blocks mid-file (resync at the next "
                        "valid block) and say how many, instead of failing")


def add_command(p: argparse.ArgumentParser, help: str) -> None:  # noqa: A002
    """``-- COMMAND``: a command to run and follow (read back with :func:`command_of`)."""
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help=help)


def command_of(args: argparse.Namespace) -> list[str]:
    """The ``-- COMMAND`` words, without the ``--`` separator ([] when none). A ``--`` with
    nothing after it is a UsageError: it would otherwise trace the whole host."""
    command = list(args.command or [])
    if command == ["--"]:
        raise UsageError("nothing after --",
                         "give the command to run after --, or drop the --")
    return command[1:] if command and command[0] == "--" else command
