"""``kvmtrace doctor``: is this host ready? Exit 0 when all that kvmtrace needs is there."""

from __future__ import annotations

import argparse
import json
import textwrap

from ..host.doctor import Check, ready, run_checks
from .args import add_json, add_subcommand

__all__ = ["register", "run", "format_check"]

EXAMPLES = """examples:
  kvmtrace doctor          # one line per requirement, with the fix for what is missing
  kvmtrace doctor --json   # one JSON object (schema 1)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "doctor",
        help="check that this host can run kvmtrace",
        description="Check every requirement: /dev/kvm, the dirty-ring capability, tracefs, "
        "the dirty-ring tracepoints, bcc, kernel headers, BPF features.",
        epilog=EXAMPLES, run=run,
    )
    add_json(p, "print one JSON object")


def format_check(c: Check, width: int = 80) -> list[str]:
    status = "ok" if c.ok else ("MISSING" if c.required else "absent")
    if not c.checked:  # not root: only root can tell
        status = "unknown"
    line = f"{status:<8}{c.name:<28}{c.detail}"
    wrap = {"break_long_words": False, "break_on_hyphens": False}
    lines = textwrap.wrap(line, width, subsequent_indent=" " * 8, **wrap) or [line]
    if not c.ok and c.checked and c.fix:
        label = "fix" if c.required else "note"
        lines += textwrap.wrap(f"{label}: {c.fix}", width, initial_indent=" " * 8,
                               subsequent_indent=" " * 14, **wrap)
    return lines


def run(args: argparse.Namespace) -> int:
    checks = run_checks()
    ok = ready(checks)
    if args.json:
        print(json.dumps({"schema": 1, "ready": ok, "checks": [c.to_json() for c in checks]}))
    else:
        for c in checks:
            print("\n".join(format_check(c)))
        print("ready" if ok else "not ready: fix the MISSING lines above")
    return 0 if ok else 2
