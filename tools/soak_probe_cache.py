#!/usr/bin/env python3
"""Soak of the probe cache (kvmtrace.bpf.objcache) under concurrent starts, as root.

    .venv/bin/python tools/soak_probe_cache.py [--runs N] [--starts K]

Each run: an empty cache folder; K processes load the probes at once (``Probes("top-light",
pid=their own)``, each compiling or, if another's entry is already written, loading it);
then one more start, which must load from the cache. A run fails when any start fails or
prints a traceback, the last start compiles, or an entry in the folder does not load
(every entry is written whole or not at all: the writers race to rename the same name).
Prints one line per run, then how the concurrent starts loaded; exit status 0 when no run
failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from _common import ROOT, parser, require_root, soak_runs

_START = ("import os; from kvmtrace.bpf.loader import Probes; "
          "p = Probes('top-light', pid=os.getpid()); print(p.load_how); p.close()")


def _start(cache: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "KVMTRACE_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("KVMTRACE_NO_CACHE", None)
    return subprocess.Popen([sys.executable, "-c", _START], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--starts", type=int, default=3, help="concurrent starts per run (3)")
    args = ap.parse_args()
    require_root("soak_probe_cache", "it loads BPF probes")
    seen: Counter[str] = Counter()

    def one(tmp: Path) -> tuple[bool, str]:
        from kvmtrace.bpf import objcache

        cache = tmp / "cache"
        procs = [_start(cache) for _ in range(args.starts)]
        hows = []
        for p in procs:
            out, err = p.communicate(timeout=300)
            if p.returncode != 0 or "Traceback" in err:
                return False, f"a start failed ({p.returncode}): {err.strip()[-300:]}"
            hows.append(out.strip())
        seen.update(hows)
        last = _start(cache)
        out, err = last.communicate(timeout=300)
        if out.strip() != "cache":
            return False, f"the start after them loaded {out.strip()!r}: {err.strip()[-300:]}"
        os.environ["KVMTRACE_CACHE_DIR"] = str(cache)
        for entry in cache.glob("*.json"):
            objcache.load(entry.stem)  # raises CacheMiss: a failed run
        left = [f.name for f in cache.iterdir() if not f.name.endswith(".json")]
        if left:
            return False, f"left in the cache folder: {left}"
        return True, f"concurrent starts: {', '.join(hows)}"

    failed = soak_runs("", args.runs, one)
    print(f"{args.runs} runs, {failed} failed; concurrent starts loaded: {dict(seen)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
