"""``kvmtrace compare BASE NEW``: did a kernel or VMM change make the dirty ring slower?

Profiles both traces (recording, tracefs text or ``perf script`` text, detected) with
:func:`kvmtrace.analysis.profile.profile_source`, compares them with
:func:`kvmtrace.analysis.comparison.compare_profiles` and prints an 80-column table
(:mod:`kvmtrace.views.compare_text`) or one JSON object. Exit status: 0 no regression,
1 a regression found, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from ..errors import UsageError
from .args import add_input, add_json, add_ring_size, add_skip_damaged, add_subcommand

__all__ = ["register", "run"]

EPILOG = """examples:
  kvmtrace compare before.kvt after.kvt          # two recordings of the same workload
  kvmtrace compare old.txt new.txt --ring-bytes 4096   # tracefs or perf script text
  kvmtrace compare before.kvt after.kvt --threshold 5 --json | jq '.metrics[]'

a verdict needs a change beyond the threshold and, for stall and reset-latency
percentiles, a bootstrap interval of the difference that excludes zero.
exit status: 0 no regression, 1 a regression found, 2 bad input
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_subcommand(
        sub, "compare",
        help="compare two traces: dirty rate, stalls, reset latency; flag regressions",
        description="Compare a BASE and a NEW trace of the same workload (recordings, "
        "tracefs or perf\nscript text) per ring index: push rate, soft-full exits per 10k "
        "pushes, entries\nper reset, max used, overwritten entries, and exact stall and "
        "reset-latency\npercentiles, each with base, new, change and a verdict.",
        epilog=EPILOG, run=run,
    )
    add_input(p, "the trace before the change", "base")
    add_input(p, "the trace after the change", "new")
    p.add_argument("--threshold", type=float, default=10.0, metavar="PCT",
                   help="smallest change in percent that gets a verdict (default 10)")
    add_json(p)
    add_ring_size(p, "ring size in entries where a trace does not say (both traces)",
                  "ring size in bytes (as given to KVM_ENABLE_CAP); or --ring-entries")
    add_skip_damaged(p)


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.threshold) or not 0 <= args.threshold < 1e6:
        raise UsageError(f"--threshold {args.threshold}: not a percentage",
                         "give a number from 0 up, e.g. --threshold 10")
    from ..analysis.comparison import compare_profiles
    from ..analysis.profile import profile_source
    from ..source.detect import open_source

    profiles = []
    for path in (args.base, args.new):
        src = open_source(path, ring_entries=args.ring_entries, ring_bytes=args.ring_bytes,
                          skip_damaged=args.skip_damaged)
        try:
            profiles.append(profile_source(src))
        except ValueError as err:  # a malformed block or line the source could not read
            raise UsageError(f"{path}: {err}", "check the file is complete") from None
        for w in src.warnings:  # text whose rings were not all told apart; damage skipped
            named = w if w.startswith(f"{path}: ") else f"{path}: {w}"
            print(f"kvmtrace compare: warning: {named}", file=sys.stderr)
        if src.truncated:
            print(f"kvmtrace compare: warning: {path} ends early (writer killed?); "
                  "compared what it holds", file=sys.stderr)
    cmp = compare_profiles(*profiles, base_path=args.base, new_path=args.new,
                           threshold_pct=args.threshold)
    if args.json:
        print(json.dumps(cmp.to_dict(), allow_nan=False))
    else:
        from ..views.compare_text import render_text

        print(render_text(cmp))
    return cmp.exit_status
