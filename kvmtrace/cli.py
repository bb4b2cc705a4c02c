"""Command line: ``kvmtrace SUBCOMMAND ...``; each subcommand lives in kvmtrace.commands."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .commands.args import Parser
from .errors import KvmtraceError

__all__ = ["main", "build_parser", "commands_for", "COMMANDS"]

# Subcommand name -> module under kvmtrace.commands exposing register(subparsers) and
# run(args) -> int.
COMMANDS = ("doctor", "workload", "top", "record", "replay", "export", "compare", "bench")

EPILOG = """examples:
  kvmtrace doctor                       # is this host ready?
  kvmtrace workload --vcpus 2 --pages 1000 --json
  kvmtrace top                          # live per-ring view (Hit q to quit)
  kvmtrace record -o run.kvt -- kvmtrace workload --vcpus 2
  kvmtrace replay run.kvt               # cross-check the rings against the model
  kvmtrace compare before.kvt after.kvt # stalls or dirty rate regressed?
  kvmtrace bench -o base/ --reps 5      # a bundle of runs; compare two bundles
"""


def build_parser(only: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    """The parser of the subcommands ``only`` (all by default)."""
    parser = Parser(
        prog="kvmtrace",
        description="Observe the KVM dirty ring (KVM_CAP_DIRTY_LOG_RING) per vCPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvmtrace {__version__}")
    parser.set_defaults(func=None)  # no subcommand: help
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    for name in only:
        module = importlib.import_module(f"kvmtrace.commands.{name}")
        module.register(sub)
    return parser


def commands_for(words: Sequence[str]) -> tuple[str, ...]:
    """The subcommands whose modules a command line needs: a named subcommand's alone (a
    live command starts sooner: the others' modules cost 0.1-0.3 s of imports), else all
    of them, for help and errors."""
    return (words[0],) if words and words[0] in COMMANDS else COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    try:
        words = list(sys.argv[1:] if argv is None else argv)
        parser = build_parser(commands_for(words))
        args = parser.parse_args(words)
    except KeyboardInterrupt:  # Ctrl-C while the commands' modules load
        return 130
    if args.func is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KvmtraceError as err:
        print(f"kvmtrace {args.subcommand}: error: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except OSError as err:  # last resort: an I/O error no command turned into advice
        where = f": {err.filename}" if err.filename else ""
        print(f"kvmtrace {args.subcommand}: error: {err.strerror or err}{where}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
