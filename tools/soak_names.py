#!/usr/bin/env python3
"""Soak VM names in recordings (issue H, item 4) on real VMs, as root.

``record -- kvmtrace workload --name NAME`` of a VMM that lives only a few milliseconds
after its first event: the recorder must name it although the process may be gone (or a
zombie) when its events are read. Each run is one pytest process running
tests/test_names_kvm.py::test_a_short_lived_vmm_keeps_its_name (checked exactly against
the VMM's own report); prints the runs and every failure (its first assertion lines);
exit 1 if any.

    .venv/bin/python tools/soak_names.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_names_kvm.py::test_a_short_lived_vmm_keeps_its_name[0]"


def run_once() -> str | None:
    """One run in a fresh pytest; None if it passed, else its first error lines."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           TEST], cwd=ROOT, capture_output=True, text=True,
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
        print("soak_names: --runs must be at least 1", file=sys.stderr)
        return 2
    failures: list[tuple[int, str]] = []
    t0 = time.monotonic()
    for i in range(args.runs):
        err = run_once()
        if err is not None:
            failures.append((i, err))
    print(f"short-lived VMM named: {args.runs - len(failures)}/{args.runs} runs passed "
          f"in {time.monotonic() - t0:.0f} s")
    for i, err in failures:
        print(f"  run {i}: {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
