#!/usr/bin/env python3
"""Soak live commands under signals (issue I, item 4) on real probes, as root.

Each run is one pytest process running the racy scenarios of
tests/test_live_signals_kvm.py: ``top -b | cat`` stopped by SIGTERM or SIGINT while the
probes load, while it runs and twice in a row; ``record -- CMD`` killed (SIGKILL,
SIGTERM) while its probes load, CMD never running. Prints the runs and every failure
(its first assertion lines); exit 1 if any.

    .venv/bin/python tools/soak_signals.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_live_signals_kvm.py::test_top_batch_piped_ends_quietly_on_a_signal",
         "tests/test_live_signals_kvm.py::test_held_command_never_runs_when_record_dies_while_loading"]


def run_once() -> str | None:
    """One run in a fresh pytest; None if it passed, else its first error lines."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *TESTS], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "KVMTRACE_REQUIRE_KERNEL": "1"})
    if proc.returncode == 0:
        return None
    errors = [ln[1:].strip() for ln in proc.stdout.splitlines() if ln.startswith("E ")]
    return " | ".join(errors[:4])[:600] or proc.stdout.strip().splitlines()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    if args.runs < 1:
        print("soak_signals: --runs must be at least 1", file=sys.stderr)
        return 2
    failures: list[tuple[int, str]] = []
    t0 = time.monotonic()
    for i in range(args.runs):
        err = run_once()
        if err is not None:
            failures.append((i, err))
        print(f"run {i + 1}/{args.runs}: {'ok' if err is None else 'FAILED'}", flush=True)
    print(f"{args.runs} runs (10 cases each: 8 top moments, 2 record kills), "
          f"{len(failures)} failed, {time.monotonic() - t0:.0f} s")
    for i, err in failures:
        print(f"  run {i + 1}: {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
