#!/usr/bin/env python3
"""Soak of replay on every core (``replay -j N``): the workers hand each other block
shares through pipes written from threads, and interleave differently on every run.

    .venv/bin/python tools/soak_parallel.py [--runs 20]

Each run writes a random recording (several VMs, anomalies, a random block size; sizes in
the meta or left to inference; every other run with column batches of 300 events and no
decoding ahead, so that the workers' shared-memory arenas are the least that is safe,
reused many times, and writers wait for room) and
replays it with 2, 3 and 4 jobs against one process:
reports equal field for field (tests/test_replay_parallel.py ``same_output``), taps
joined in block order. Then the same recording with a block in the middle damaged: the
same error whatever the jobs, and no worker left behind. Prints one line per run; exit 1
if any run failed. Needs no kernel.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from _common import ROOT, seeded_soak

sys.path.insert(0, str(ROOT / "tests"))

from test_replay_agree import PID, VM, random_stream  # noqa: E402
from test_replay_columns import write  # noqa: E402
from test_replay_parallel import one_and_many, same_output  # noqa: E402

from kvmtrace.analysis.replay import colfeed, engine, parallel, replay_source  # noqa: E402
from kvmtrace.analysis.replay.parallel import replay_parallel  # noqa: E402
from kvmtrace.core.sources import SourceMeta  # noqa: E402
from kvmtrace.source.recording import open_recording  # noqa: E402


def one(tmp: Path, seed: int) -> tuple[bool, str]:
    small = seed % 2 == 1  # small batches, no decoding ahead: arenas of a few blocks
    batch = 300 if small else colfeed.COLUMN_BATCH
    ahead = parallel.AHEAD
    engine.COLUMN_BATCH = parallel.COLUMN_BATCH = batch
    parallel.AHEAD = 0 if small else ahead
    try:
        ok, text = _one(tmp, seed)
    finally:
        engine.COLUMN_BATCH = parallel.COLUMN_BATCH = colfeed.COLUMN_BATCH
        parallel.AHEAD = ahead
    return ok, f"{text}, batches of {batch}{', nothing ahead' if small else ''}"


def _one(tmp: Path, seed: int) -> tuple[bool, str]:
    rng = np.random.default_rng(seed)
    nvm = int(rng.integers(1, 4))
    parts = []
    for i in range(nvm):
        ev = random_stream(int(rng.integers(0, 1 << 20)))
        ev["pid"], ev["vm"] = PID + i, VM + i
        parts.append(ev)
    mix = np.concatenate(parts)
    mix = mix[np.argsort(mix["ts"], kind="stable")]
    sized = bool(rng.integers(0, 2))
    meta = SourceMeta(kind="soak", ring_entries={(PID + i, VM + i): 256 for i in range(nvm)}
                      if sized else {})
    block = int(rng.choice([31, 200, 977]))
    path = write(tmp / "r.kvt", mix, meta, block_events=block)
    spread = 0
    for jobs in (2, 3, 4):
        if replay_parallel(open_recording(path), jobs, min_events=0) is None:
            continue  # one unit of work: one process
        one_r, many = one_and_many(path, jobs, keep_harvest=True)
        same_output(one_r, many)
        spread += 1
    rec = open_recording(path)
    if len(rec._index) >= 3:
        data = bytearray(path.read_bytes())
        data[rec._index[len(rec._index) // 2][0] + 60] ^= 0xFF
        path.write_bytes(bytes(data))
        errors = []
        for jobs in (1, 2, 3):
            try:
                replay_source(open_recording(path), jobs=jobs, min_events=0)
                errors.append(None)
            except Exception as err:  # noqa: BLE001
                errors.append(str(err))
        if len(set(errors)) != 1 or errors[0] is None:
            return False, f"damaged block: {errors}"
    try:
        left = os.waitpid(-1, os.WNOHANG)
        return False, f"a worker left behind: {left}"
    except ChildProcessError:
        pass
    return True, (f"{nvm} VM(s), sizes {'in meta' if sized else 'inferred'}, blocks of "
                  f"{block}, {len(mix)} events: spread with {spread} of 3 job counts")


def main() -> int:
    return seeded_soak(__doc__, "parallel ", 1000, one)


if __name__ == "__main__":
    sys.exit(main())
