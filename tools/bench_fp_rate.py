#!/usr/bin/env python3
"""False-positive rate of ``kvmtrace compare`` on bundles: same scenario against itself.

    .venv/bin/python tools/bench_fp_rate.py [--comparisons N] [--reps R] [--preset NAME]
                                            [--threshold ...] [--delay-us US] [--keep DIR]
                                            (root, /dev/kvm)

Writes 2N bundles of one preset with ``kvmtrace bench`` (R runs each, one after the other
on this host) and compares them in N disjoint pairs with ``kvmtrace compare --json``: both
sides ran the same thing, so every exit 1 is a false positive. Prints one line per
comparison (exit status, what was called a regression), then the false-positive rate with
a Wilson 95 % interval, which metrics fired, and the same rate over every pair of the 2N
bundles (pairs share bundles, so those comparisons are not independent; a second look,
not the figure). The host's load average is printed before and after: on a loaded host
runs vary more, which the intervals absorb, and the rate is what matters.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import combinations
from pathlib import Path

from _common import kvmtrace_cmd, parser, require_root

from kvmtrace.analysis.bundle import load_side, measure
from kvmtrace.analysis.comparison import Thresholds
from kvmtrace.analysis.rep_comparison import compare_reps
from kvmtrace.commands.compare import parse_thresholds
from kvmtrace.source.recording import open_recording


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def bench(out: Path, reps: int, preset: str, extra: tuple[str, ...] = ()) -> None:
    """``kvmtrace bench`` into ``out``, unless a bundle is there already (--keep DIR of an
    earlier run: its bundles are compared again)."""
    if (out / "bundle.json").is_file():
        return
    if out.is_dir():  # an interrupted earlier run: start this bundle again
        for f in out.iterdir():
            f.unlink()
        out.rmdir()
    p = subprocess.run(kvmtrace_cmd("bench", "-o", str(out), "--reps", str(reps),
                                    "--preset", preset, *(("--", *extra) if extra else ())),
                       capture_output=True, text=True, timeout=120 + 60 * reps)
    if p.returncode != 0:
        raise SystemExit(f"bench_fp_rate: kvmtrace bench failed: {p.stderr.strip()[-400:]}")


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--comparisons", type=int, default=20, help="disjoint pairs (20)")
    ap.add_argument("--reps", type=int, default=3, help="runs per bundle (3)")
    ap.add_argument("--preset", default="small-ring-heavy", help="bench preset")
    ap.add_argument("--threshold", action="append", default=[],
                    help="passed to kvmtrace compare (repeatable)")
    ap.add_argument("--delay-us", type=float, metavar="US",
                    help="give every second bundle --harvest-delay-us US: then the rate is "
                    "the detection rate (stall_p50 a regression), not false positives")
    ap.add_argument("--keep", metavar="DIR", help="write the bundles here and keep them "
                    "(bundles already there are reused)")
    args = ap.parse_args()
    require_root("bench_fp_rate", "kvmtrace bench loads BPF", kvm=True)
    thresholds = parse_thresholds(args.threshold)
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="kvmtrace-fp-")
    root = Path(args.keep or tmp.name)  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{args.comparisons} comparisons of {args.preset}, {args.reps} runs per bundle",
          flush=True)
    t0 = time.monotonic()
    bundles = []
    false_pos = 0
    fired: Counter[str] = Counter()
    th_args = [a for t in args.threshold for a in ("--threshold", t)]
    for i in range(args.comparisons):
        pair = [root / f"c{i:02d}-a", root / f"c{i:02d}-b"]
        bench(pair[0], args.reps, args.preset)
        bench(pair[1], args.reps, args.preset,
              ("--harvest-delay-us", f"{args.delay_us:g}") if args.delay_us else ())
        bundles += pair
        p = subprocess.run(kvmtrace_cmd("compare", str(pair[0]), str(pair[1]), "--json",
                                        *th_args), capture_output=True, text=True,
                           timeout=600)
        if p.returncode not in (0, 1):
            raise SystemExit(f"bench_fp_rate: compare failed: {p.stderr.strip()[-400:]}")
        d = json.loads(p.stdout)
        what = [m["key"] for m in d["metrics"] if m["verdict"] == "regression"] + \
            [f"ring {a['kind']}" for a in d["anomalies"] if a["verdict"] == "regression"]
        false_pos += (p.returncode == 1 if not args.delay_us else "stall_p50" in what)
        fired.update(what)
        print(f"comparison {i + 1:2d}: exit {p.returncode}"
              + (f"  regression: {', '.join(what)}" if what else ""), flush=True)
    n = args.comparisons
    lo, hi = wilson(false_pos, n)
    label = "false positives" if not args.delay_us else \
        f"--harvest-delay-us {args.delay_us:g} detected as a stall_p50 regression"
    print(f"\n{label}: {false_pos}/{n} = {false_pos / n:.1%} "
          f"(Wilson 95% interval {lo:.1%}..{hi:.1%}); {time.monotonic() - t0:.0f} s")
    if fired:
        print("fired: " + ", ".join(f"{k} {v}" for k, v in fired.most_common()))
    if not args.delay_us:  # bundles of two scenarios have no all-pairs rate
        all_pairs(bundles, thresholds)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def all_pairs(bundles: list[Path], thresholds: Thresholds) -> None:
    """The rate over every pair of ``bundles``, compared in this process."""
    reps = []
    for b in bundles:
        side = []
        for rec in load_side(b).recordings:
            src = open_recording(rec)
            try:
                side.append(measure(src, str(rec))[1])
            finally:
                src.close()
        reps.append(side)
    pairs = list(combinations(range(len(reps)), 2))
    hits = sum(compare_reps(reps[a], reps[b], thresholds).exit_status for a, b in pairs)
    print(f"every pair of the {len(reps)} bundles (not independent): {hits}/{len(pairs)} = "
          f"{hits / len(pairs):.1%}")

if __name__ == "__main__":
    sys.exit(main())
