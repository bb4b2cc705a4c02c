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

import sys

from _common import parser, pytest_once, repeat, require_root

TEST = "tests/test_names_kvm.py::test_a_short_lived_vmm_keeps_its_name[0]"


def main() -> int:
    args = parser(__doc__, runs=20).parse_args()
    require_root("soak_names", "BPF, /dev/kvm")
    out = repeat(lambda: pytest_once(TEST), args.runs)
    print(f"short-lived VMM named: {out.runs - len(out.failures)}/{out.runs} runs passed "
          f"in {out.seconds:.0f} s")
    for failure in out.failures:
        print(f"  {failure}")
    return 1 if out.failures else 0


if __name__ == "__main__":
    sys.exit(main())
