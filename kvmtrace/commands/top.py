"""`kvmtrace top` (not built yet)."""

from __future__ import annotations

import argparse

from ..errors import KvmtraceError

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="(not built yet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise KvmtraceError("'kvmtrace top' is not built yet")
