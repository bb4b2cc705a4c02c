"""`kvmtrace export` (not built yet)."""

from __future__ import annotations

import argparse

from ..errors import KvmtraceError

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="(not built yet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    raise KvmtraceError("'kvmtrace export' is not built yet")
