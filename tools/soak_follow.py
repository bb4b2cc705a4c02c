#!/usr/bin/env python3
"""Soak of following ``-- COMMAND``'s process tree (issue 10, item 4): as root, with /dev/kvm.

    .venv/bin/python tools/soak_follow.py [--runs N] [--scenario NAME ...]

Each run is one test of tests/test_live_signals_kvm.py in a fresh pytest (kernel features
required, so a skip is a failure); the race they guard is the VMM forked below a wrapper
creating its VM and vCPUs before the probes know of it:

  record-sh      ``record -- sh -c 'VMM; true'``: per ring, pushes and soft-full exits
                 equal the VMM's own counts (its --json report), no warning
  record-python  the same with a Python wrapper that forks a shell that forks the VMM
  top-sh         ``top -b --json -- sh -c 'VMM; true'``: the last interval's pushes,
                 soft-full exits and resets per ring equal the VMM's own
  top-python     the same with the Python wrapper
  map-empty      the probes' ``followed`` map holds the VMM while it runs, nothing after

Prints per scenario: runs, failures and seconds, then each failure's first error lines.
Exit status 0 when nothing failed.
"""

from __future__ import annotations

from _common import Column, Table, parser, pytest_once, repeat, require_root

TESTS = "tests/test_live_signals_kvm.py::"
SCENARIOS = {
    "record-sh": TESTS + "test_record_follows_the_vmm_below_a_wrapper[sh]",
    "record-python": TESTS + "test_record_follows_the_vmm_below_a_wrapper[python]",
    "top-sh": TESTS + "test_top_follows_the_vmm_below_a_wrapper[sh]",
    "top-python": TESTS + "test_top_follows_the_vmm_below_a_wrapper[python]",
    "map-empty": TESTS + "test_followed_processes_leave_the_map_when_they_exit",
}


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                    help="only these (default: all)")
    args = ap.parse_args()
    require_root("soak_follow", "the tests load BPF probes", kvm=True)
    table = Table([Column("scenario", "<14"), Column("runs", ">5"),
                   Column("failed", ">7"), Column("seconds", ">8", ">8.1f")])
    print(table.header())
    failed = 0
    for name in args.scenario or SCENARIOS:
        test = SCENARIOS[name]
        out = repeat(lambda test=test: pytest_once(test), args.runs)
        print(table.row(name, out.runs, len(out.failures), out.seconds), flush=True)
        for f in out.failures:
            print(f"  {f}")
        failed += len(out.failures)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
