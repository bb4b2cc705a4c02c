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

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from replay_capture import (  # noqa: E402
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("--format", action="append", choices=sorted(FORMATS))
    ap.add_argument("--keep", metavar="DIR", help="copy the runs that mismatched to DIR")
    args = ap.parse_args()
    scenarios = args.scenario or list(SCENARIOS)
    formats = args.format or list(FORMATS)
    failed = False
    print(f"{'scenario':<14} {'format':<12} {'runs':>4} {'lossy':>5} {'anomalies':>9} "
          f"{'on clean':>8} {'mismatch':>8} {'pages':>5} {'ahead':>5} "
          f"{'cut':>5} {'s/run':>6}")
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
                print(f"{name:<14} {fmt:<12} {args.runs:>4} {lossy:>5} {anomalies:>9} "
                      f"{clean_anomalies:>8} {mismatched:>8} {pages:>5} {ahead:>5} "
                      f"{cut:>5} {per:>6.1f}",
                      flush=True)
                for note in notes[:3]:
                    print(f"    {note}")
                failed |= bool(mismatched)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
