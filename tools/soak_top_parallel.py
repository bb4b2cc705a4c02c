#!/usr/bin/env python3
"""Soak of ``top --replay`` on every core (``top -j N``): the workers share blocks through
shared memory and pipes and the parent reads their windows as they come, interleaved
differently on every run.

    .venv/bin/python tools/soak_top_parallel.py [--runs 20]

Each run writes a random recording (several VMs in two processes, sizes in the meta or
not, a ring size told again mid-file, anomalies; a random block size; every other run no
decoding ahead, so the arenas are the least that is safe and writers wait for room) and
walks it at a random step with 2, 3 and 4 workers against one process: every window's
snapshot equal (tests/test_top_parallel.py ``same_snapshots``). Then the same recording
with a block in the middle damaged: the same error at the same window whatever the
workers. Then ``kvmtrace top -b --json -j 2`` on it, stopped by SIGINT or SIGTERM after a
random number of lines: status 0, no traceback, no worker left (every 4th run a worker
killed instead: one line, no worker left; status 0 if the file ended first). Prints one
line per run; exit 1 if any run failed. Needs no kernel.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from _common import ROOT, kvmtrace_cmd, seeded_soak

sys.path.insert(0, str(ROOT / "tests"))

from test_replay_columns import write  # noqa: E402
from test_top_parallel import gone, mixed_stream, same_snapshots, workers_of  # noqa: E402

from kvmtrace.analysis.aggregate import ReplaySource  # noqa: E402
from kvmtrace.analysis.replay import parallel  # noqa: E402
from kvmtrace.analysis.spread_snapshots import open_replay  # noqa: E402
from kvmtrace.source.recording import open_recording  # noqa: E402


def windows_until_error(path: Path, step: int, jobs: int) -> tuple[int, str]:
    src = (ReplaySource(open_recording(path), step) if jobs == 1
           else open_replay(open_recording(path), step, jobs=jobs, min_events=0))
    n = 0
    try:
        while not src.done:
            src.snapshot()
            n += 1
    except Exception as err:  # noqa: BLE001 - what the soak compares
        return n, str(err)
    finally:
        src.close()
    return n, ""


def stopped(path: Path, sig: signal.Signals, lines: int, kill_worker: bool = False
            ) -> str | None:
    """``top -b --json -j 2`` ended by ``sig`` after ``lines`` lines (``kill_worker``: a
    worker killed instead, top ending with one line): what went wrong."""
    proc = subprocess.Popen(kvmtrace_cmd("top", "-b", "--json", "-d", "0.00001", "-j", "2",
                                         "--replay", str(path)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=ROOT)
    assert proc.stdout is not None
    kids: list[int] = []
    for _ in range(lines):
        if not proc.stdout.readline():
            break
        kids = kids or workers_of(proc.pid)
    if kill_worker and kids:
        os.kill(kids[-1], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        if proc.returncode not in (0, 2) or len(err.splitlines()) > 1 or b"Traceback" in err:
            return f"worker killed: status {proc.returncode}: {err.decode()[-300:]}"
        return None if gone(kids) else f"worker killed: workers {kids} left"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode != 0 or b"Traceback" in err:
        return f"{sig.name}: status {proc.returncode}: {err.decode()[-300:]}"
    if not gone(kids):
        return f"{sig.name}: workers {kids} left"
    return None


def one(tmp: Path, seed: int) -> tuple[bool, str]:
    rng = np.random.default_rng(seed)
    ahead = parallel.AHEAD
    parallel.AHEAD = 0 if seed % 2 else ahead
    try:
        ev, meta = mixed_stream(seed)
        if rng.random() < 0.5:
            meta.ring_entries.clear()
        block = int(rng.choice([97, 500, 2048, 8192]))
        path = write(tmp / "s.kvt", ev, meta, block_events=block)
        span = int(ev["ts"][-1] - ev["ts"][0])
        step = max(1, span // int(rng.integers(2, 3000)))
        for jobs in (2, 3, 4):
            same_snapshots(path, step, jobs)
        rec = open_recording(path)
        data = bytearray(path.read_bytes())
        data[rec._index[int(rng.integers(0, len(rec._index)))][0] + 60] ^= 0xFF
        bad = tmp / "bad.kvt"
        bad.write_bytes(bytes(data))
        ends = {windows_until_error(bad, step, jobs) for jobs in (1, 2, 3)}
        if len(ends) != 1 or not next(iter(ends))[1]:
            return False, f"damaged block: {ends}"
    finally:
        parallel.AHEAD = ahead
    sig = signal.SIGINT if seed % 3 else signal.SIGTERM
    lines = int(rng.integers(1, 200))
    kill = seed % 4 == 3
    why = stopped(path, sig, lines, kill)
    if why:
        return False, why
    return True, (f"{len(ev)} events, blocks of {block}, {span // step} windows, "
                  f"{'no decoding ahead, ' if seed % 2 else ''}error at window "
                  f"{next(iter(ends))[0]}, {'a worker killed' if kill else sig.name} after "
                  f"{lines} lines")


def main() -> int:
    return seeded_soak(__doc__, "top -j ", 2000, one)


if __name__ == "__main__":
    sys.exit(main())
