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

import sys

from _common import parser, pytest_once, repeat, require_root

TESTS = ["tests/test_live_signals_kvm.py::test_top_batch_piped_ends_quietly_on_a_signal",
         "tests/test_live_signals_kvm.py::test_held_command_never_runs_when_record_dies_while_loading"]


def main() -> int:
    args = parser(__doc__, runs=20).parse_args()
    require_root("soak_signals", "BPF, /dev/kvm")
    out = repeat(lambda: pytest_once(*TESTS), args.runs)
    print(f"{out.runs} runs (10 cases each: 8 top moments, 2 record kills), "
          f"{len(out.failures)} failed, {out.seconds:.0f} s")
    for failure in out.failures:
        print(f"  {failure}")
    return 1 if out.failures else 0


if __name__ == "__main__":
    sys.exit(main())
