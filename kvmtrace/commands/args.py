"""Argument helpers shared by the subcommands.

Every subcommand module registers its parser with :func:`add_subcommand` and adds the
options it shares with others through the helpers here, so one option reads and behaves
the same in every command that has it: the input file, ``--json``, the ring size of a
trace that does not say (``--ring-entries``/``--ring-bytes``, 16-byte
``struct kvm_dirty_gfn`` entries or bytes as given to ``KVM_ENABLE_CAP``), ``-p PID``,
``--hook`` and ``-- COMMAND``. Where commands word an option differently for their own
context, the helper takes that command's help text. Values the library checks (ring
sizes, hooks) are checked there, so a bad one is one ``UsageError`` line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["HOOKS", "add_subcommand", "add_input", "add_json", "add_ring_size", "add_pid",
           "add_command", "command_of"]

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


def add_ring_size(p: argparse.ArgumentParser, entries_help: str, bytes_help: str | None = None,
                  *, typed: bool = True, entries_metavar: str = "N") -> None:
    """``--ring-entries N`` and (unless ``bytes_help`` is None) ``--ring-bytes B``: the ring
    size where the input does not say. ``typed=False`` keeps the strings for the command
    to check (one error line naming the flag and the values it takes)."""
    kind = {"type": int} if typed else {}
    p.add_argument("--ring-entries", metavar=entries_metavar, help=entries_help, **kind)
    if bytes_help is not None:
        p.add_argument("--ring-bytes", metavar="B", help=bytes_help, **kind)


def add_pid(p: argparse.ArgumentParser, *, typed: bool = True) -> None:
    """``-p PID``: only this VMM process (0 = all). ``typed=False`` keeps the string for the
    command to check."""
    if typed:
        p.add_argument("-p", "--pid", type=int, default=0, help="only this VMM process")
    else:
        p.add_argument("-p", "--pid", default="0", metavar="PID", help="only this VMM process")


def add_command(p: argparse.ArgumentParser, help: str) -> None:  # noqa: A002
    """``-- COMMAND``: a command to run and follow (read back with :func:`command_of`)."""
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help=help)


def command_of(args: argparse.Namespace) -> list[str]:
    """The ``-- COMMAND`` words, without the ``--`` separator ([] when none)."""
    command = list(args.command or [])
    return command[1:] if command and command[0] == "--" else command
