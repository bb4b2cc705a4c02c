#!/usr/bin/env python3
"""Soak of the replay against the built-in VMM's ground truth (as root, on /dev/kvm).

    .venv/bin/python tools/soak_replay.py [--runs N] [--scenario NAME ...] [--format F ...]

Each racy scenario runs N times (default 20) through each trace format: ``kvmtrace record``
(a recording), a tracefs instance filtered to the workload's pid (tracefs text) and
``perf record -- CMD`` + ``perf script`` (default microsecond timestamps). Every run is
replayed and held to the workload's own numbers, exactly: pushes, entries reset, soft-full
exits and lost pages per ring, and no anomaly on a run that lost nothing
(tests/replay_capture.py, ``compare``). Prints, per scenario and format, runs, runs that
lost pages or got stuck (the VMM's counts and KVM_RESET_DIRTY_RINGS's returns say so),
anomalies reported in total and on clean runs, mismatches
(with the first few) and, apart, runs where the number of lost pages agreed but not which
(a harvest in flight during an overflow), and single-pass runs whose lost pages were not
compared because the VMM's harvest cursor ran ahead of the kernel's reset_index ("ahead":
the VMM read entries no reset collected; tests/replay_capture.py, ``compare``), and
captures that did not hold the whole run ("cut": perf here now and then delivers only part
of it), which are not compared. Exit status 1 when any run mismatched.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import Column, Table, parser
from replay_capture import (
    AHEAD,
    INCOMPLETE,
    PAGES_DIFFER,
    clean,
    compare,
    perf_run,
    record_run,
    tracefs_run,
)

REAPER = ("--exit-every", "0", "--harvest", "reaper", "--reaper-ms", "1")
SCENARIOS = {
    # a reaper harvesting every 1 ms while the vCPU pushes: resets race with pushes
    "reaper-1vcpu": ("--vcpus", "1", *REAPER),
    "reaper-2vcpu": ("--vcpus", "2", *REAPER),
    # the README's sustained workload, 1 vCPU, 64 KiB rings: hundreds of racing resets
    "reaper-long": ("--vcpus", "1", "--ring-bytes", "65536", "--pages", "20000", *REAPER,
                    "--duration", "1"),
    # a single-pass tight loop overflowing a 256-entry ring (lost pages, stuck ring)
    "tight-300": ("--vcpus", "1", "--ring-bytes", "4096", "--pages", "300",
                  "--exit-every", "0"),
    "tight-3000": ("--vcpus", "1", "--ring-bytes", "4096", "--pages", "3000",
                   "--exit-every", "0"),
    # exits every 8 pages with a reaper: resets before the next guest entry (no no_exit)
    "exit8-reaper": ("--vcpus", "1", "--exit-every", "8", "--harvest", "reaper",
                     "--pages", "5000", "--passes", "3"),
}
FORMATS = {"recording": record_run, "ftrace": tracefs_run, "perf-script": perf_run}
TABLE = Table([Column("scenario", "<14"), Column("format", "<12"), Column("runs", ">4"),
               Column("lossy", ">5"), Column("anomalies", ">9"), Column("on clean", ">8"),
               Column("mismatch", ">8"), Column("pages", ">5"), Column("ahead", ">5"),
               Column("cut", ">5"), Column("s/run", ">6", ">6.1f")])


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("--format", action="append", choices=sorted(FORMATS))
    ap.add_argument("--keep", metavar="DIR", help="copy the runs that mismatched to DIR")
    args = ap.parse_args()
    scenarios = args.scenario or list(SCENARIOS)
    formats = args.format or list(FORMATS)
    failed = False
    print(TABLE.header())
    with tempfile.TemporaryDirectory(prefix="soak-replay-") as tmp:
        for name in scenarios:
            for fmt in formats:
                lossy = anomalies = clean_anomalies = mismatched = pages = ahead = cut = 0
                notes: list[str] = []
                t0 = time.monotonic()
                for k in range(args.runs):
                    out = Path(tmp) / f"{name}-{fmt}-{k}"
                    try:
                        run = FORMATS[fmt](out, *SCENARIOS[name])
                        n, bad = compare(run)
                    except (RuntimeError, OSError) as err:
                        n, bad = 0, [f"run failed: {err}"]
                        run = None
                    ok = run is not None and clean(run)
                    lossy += run is not None and not ok
                    anomalies += n
                    clean_anomalies += n if ok else 0
                    pages += any(b.startswith(PAGES_DIFFER) for b in bad)
                    ahead += any(b.startswith(AHEAD) for b in bad)
                    cut += any(b.startswith(INCOMPLETE) for b in bad)
                    bad = [b for b in bad
                           if not b.startswith((PAGES_DIFFER, AHEAD, INCOMPLETE))]
                    if bad:
                        mismatched += 1
                        notes += bad[:2]
                        if args.keep:
                            shutil.copytree(out, Path(args.keep) / out.name,
                                            dirs_exist_ok=True)
                    for f in out.glob("*.data"):
                        f.unlink()
                per = (time.monotonic() - t0) / max(args.runs, 1)
                print(TABLE.row(name, fmt, args.runs, lossy, anomalies, clean_anomalies,
                                mismatched, pages, ahead, cut, per), flush=True)
                for note in notes[:3]:
                    print(f"    {note}")
                failed |= bool(mismatched)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
