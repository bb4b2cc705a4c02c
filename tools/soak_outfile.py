#!/usr/bin/env python3
"""Soak of output safety (issue 10, items 1 and 6): signals at random moments, as root.

    .venv/bin/python tools/soak_outfile.py [--runs N] [--scenario NAME ...]

Scenarios (each run sends its signal after a random delay; for record, half the runs
while the probes load, half after the recording began):

  export-kill   ``kvmtrace export`` of a million events (Perfetto or Parquet, alternately)
                over an existing file, SIGKILLed: the file is the old one byte for byte or
                (when the export won the race) the complete export; the next export to it
                leaves no temporary file
  export-term   the same with SIGTERM or SIGINT: old or complete, never a temporary file
  record-kill   ``kvmtrace record -o FILE -- kvmtrace workload`` over an existing FILE,
                SIGKILLed: FILE and FILE.old unchanged, the ``.partial`` file (if the probes
                loaded) readable
  record-term   the same with SIGTERM: FILE a complete new recording, FILE.old the old FILE

Prints per scenario: runs, failures and seconds; then what the signals met (old file kept,
export completed, temporary file left, .partial left, recording renamed) counted over all
runs. Exit status 0 when nothing failed.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import Column, Table, kvmtrace_cmd, parser, repeat, require_root
from test_recording import META, synthetic

from kvmtrace.errors import UsageError
from kvmtrace.source.recording import RecordingWriter, open_recording

SCENARIOS = ("export-kill", "export-term", "record-kill", "record-term")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name.endswith((".tmp", ".partial"))]


class Soak:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.src = tmp / "big.kvt"
        with RecordingWriter(self.src, META) as w:
            w.write(synthetic(1_000_000, vcpus=2, seed=7))
        self.ref = {}
        for fmt in ("--perfetto", "--parquet"):  # the complete exports, to compare with
            out = tmp / f"ref{fmt}"
            subprocess.run(kvmtrace_cmd("export", str(self.src), fmt, str(out)), check=True,
                           capture_output=True)
            self.ref[fmt] = sha(out)
        self.n = 0
        self.rng = random.Random(1)
        #: what the signal met, per scenario kind: "old kept", "completed", ".partial", ...
        self.seen: Counter[str] = Counter()

    def export(self, sigs: tuple[signal.Signals, ...]) -> str | None:
        self.n += 1
        fmt = ("--perfetto", "--parquet")[self.n % 2]
        d = self.tmp / f"e{self.n}"
        d.mkdir()
        dest = d / "out"
        dest.write_text("old\n")
        proc = subprocess.Popen(kvmtrace_cmd("export", str(self.src), fmt, str(dest)),
                                stderr=subprocess.PIPE, text=True)
        time.sleep(self.rng.uniform(0.2, 4.0))
        sig = self.rng.choice(sigs)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if "Traceback" in err:
            return f"traceback: {err.strip().splitlines()[-1]}"
        if dest.read_bytes() != b"old\n" and sha(dest) != self.ref[fmt]:
            return f"{fmt} after {sig.name}: the destination is neither old nor complete"
        left = temps(d)
        self.seen["export: " + ("old kept" if dest.read_bytes() == b"old\n" else "completed")
                  + (", temp left" if left else "")] += 1
        if sig != signal.SIGKILL and left:
            return f"{fmt} after {sig.name}: left {[p.name for p in left]}"
        if len(left) > 1:
            return f"{fmt} after SIGKILL: left {[p.name for p in left]}"
        if left:  # the next export to the same file removes the dead one's file
            subprocess.run(kvmtrace_cmd("export", str(self.src), fmt, str(dest)), check=True,
                           capture_output=True)
            if temps(d) or sha(dest) != self.ref[fmt]:
                return f"{fmt}: the next export left {[p.name for p in temps(d)]}"
        return None

    def record(self, sig: signal.Signals) -> str | None:
        self.n += 1
        d = self.tmp / f"r{self.n}"
        d.mkdir()
        out, old = d / "run.kvt", d / "run.kvt.old"
        out.write_bytes(b"the newer recording")
        old.write_bytes(b"the older recording")
        work = kvmtrace_cmd("workload", "--vcpus", "1", "--pages", "2000", "--duration", "5",
                            "--exit-every", "4")
        proc = subprocess.Popen(kvmtrace_cmd("record", "-o", str(out), "--", *work),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if self.rng.random() < 0.5:  # while the probes load (seconds here)
            time.sleep(self.rng.uniform(0.1, 3.0))
        else:  # while it records: after the .partial file appeared
            deadline = time.monotonic() + 60
            while not temps(d) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(self.rng.uniform(0.0, 3.0))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if "Traceback" in err:
            return f"traceback: {err.strip().splitlines()[-1]}"
        left = temps(d)
        self.seen[f"record {sig.name}: " + (".partial left" if left else "no .partial")
                  + (", renamed" if old.read_bytes() == b"the newer recording" else "")] += 1
        if sig == signal.SIGKILL:
            if (out.read_bytes(), old.read_bytes()) != (b"the newer recording",
                                                         b"the older recording"):
                return "SIGKILL: FILE or FILE.old changed"
            for p in left:
                try:
                    open_recording(p).read_all()
                except UsageError as e:
                    if p.stat().st_size:  # an empty one: killed before the header
                        return f"SIGKILL: {p.name} unreadable: {e}"
            return None
        if proc.returncode == -signal.SIGTERM:  # before the recorder handles SIGTERM
            unchanged = (out.read_bytes(), old.read_bytes()) == (b"the newer recording",
                                                                 b"the older recording")
            return None if unchanged and not left else "SIGTERM at start: files changed"
        if left or old.read_bytes() != b"the newer recording":
            return f"SIGTERM: left {[p.name for p in left]} or FILE.old is not the old FILE"
        rec = open_recording(out)
        return None if not rec.truncated else "SIGTERM: the recording has no END block"


def main() -> int:
    ap = parser(__doc__, runs=20)
    ap.add_argument("--scenario", action="append", choices=SCENARIOS,
                    help="only these (default: all)")
    args = ap.parse_args()
    require_root("soak_outfile", "record loads BPF probes", kvm=True)
    table = Table([Column("scenario", "<12"), Column("runs", ">5"),
                   Column("failed", ">7"), Column("seconds", ">8", ">8.1f")])
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        soak = Soak(Path(tmp))
        runs = {
            "export-kill": lambda: soak.export((signal.SIGKILL,)),
            "export-term": lambda: soak.export((signal.SIGTERM, signal.SIGINT)),
            "record-kill": lambda: soak.record(signal.SIGKILL),
            "record-term": lambda: soak.record(signal.SIGTERM),
        }
        print(table.header())
        for name in args.scenario or SCENARIOS:
            out = repeat(runs[name], args.runs)
            print(table.row(name, out.runs, len(out.failures), out.seconds))
            for f in out.failures:
                print(f"  {f}")
            failed += len(out.failures)
        for what, n in sorted(soak.seen.items()):
            print(f"{n:5d}  {what}")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
