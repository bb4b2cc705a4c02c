"""What the tools/ scripts (soak_*.py, bench_*.py) share: importing this module makes the
checkout's ``kvmtrace`` and the tests' capture helpers (tests/*.py) importable; then the
command lines of kvmtrace and of the benchmark workload, the root check, the ``--runs`` and
``--rounds`` options, a run-and-count loop and fixed-width result tables.

A script imports it first (``from _common import ...``), before any ``kvmtrace`` import;
tools/ is on ``sys.path`` as the script's own folder. Tests never import tools/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "tests", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

__all__ = ["ROOT", "kvmtrace_cmd", "reaper_workload", "cpu_seconds", "require_root", "soak_tests",
           "parser", "Outcome", "repeat", "soak_runs", "seeded_soak", "pytest_once", "Column",
           "Table"]

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def kvmtrace_cmd(*args: str) -> list[str]:
    """argv that runs this checkout's kvmtrace with this interpreter."""
    return [sys.executable, "-m", "kvmtrace", *args]


def reaper_workload(seconds: float | None, *, vcpus: int = 2, pages: int = 16000,
                    json_out: bool = True) -> list[str]:
    """The benchmarks' sustained workload: ``kvmtrace workload`` with a tight guest loop
    (no I/O exits) over 1 MiB rings and a reaper harvesting every 10 ms, so pages are
    dirtied again as fast as they are given back; ``seconds`` None: no --duration."""
    return kvmtrace_cmd("workload", *(["--json"] if json_out else []), "--vcpus", str(vcpus),
                        "--ring-bytes", "1048576", "--pages", str(pages), "--exit-every",
                        "0", "--harvest", "reaper", "--reaper-ms", "10",
                        *([] if seconds is None else ["--duration", str(seconds)]))


def test_program(name: str) -> Any:
    """The programs of tests/bpf/NAME (no kvmtrace code) compiled and attached by bcc (a
    ``bcc.BPF``; the caller calls ``cleanup()``), with kvmtrace's kernel headers."""
    from bcc import BPF

    from kvmtrace.host.headers import use_headers

    use_headers()
    return BPF(src_file=str(ROOT / "tests/bpf" / name).encode())


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads, no children), seconds
    (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def require_root(tool: str, needs: str, *, kvm: bool = False) -> None:
    """Exit 2 with one line unless root (and, with ``kvm``, /dev/kvm read-write)."""
    if os.geteuid() != 0 or (kvm and not os.access("/dev/kvm", os.R_OK | os.W_OK)):
        print(f"{tool}: needs root ({needs})", file=sys.stderr)
        raise SystemExit(2)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give 1 or more")
    return n


def parser(doc: str | None, *, runs: int | None = None,
           rounds: int | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser described by the first line of ``doc``, with ``--runs`` (a soak:
    runs per scenario) and/or ``--rounds`` (a benchmark) when their default is given."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    if runs is not None:
        ap.add_argument("--runs", type=_positive, default=runs,
                        help=f"runs per scenario ({runs})")
    if rounds is not None:
        ap.add_argument("--rounds", type=_positive, default=rounds,
                        help=f"rounds of every mode ({rounds})")
    return ap


@dataclass
class Outcome:
    """What :func:`repeat` saw: runs, the failures (``run N: why``) and the seconds."""

    runs: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def first(self) -> str | None:
        """The first failure's reason (without its run number), or None."""
        return self.failures[0].split(": ", 1)[1] if self.failures else None


def repeat(run: Callable[[], str | None], runs: int) -> Outcome:
    """Call ``run`` ``runs`` times; each call returns None (as expected) or why not. An
    exception is a failure of that run (``error: ...``), not of the soak."""
    out = Outcome()
    t0 = time.monotonic()
    for i in range(runs):
        try:
            why = run()
        except Exception as err:  # noqa: BLE001
            why = f"error: {type(err).__name__}: {err}"
        out.runs += 1
        if why is not None:
            out.failures.append(f"run {i}: {why}")
    out.seconds = time.monotonic() - t0
    return out


def pytest_once(*tests: str) -> str | None:
    """Run ``tests`` (pytest node ids) in a fresh pytest of this checkout, kernel features
    required; None if they passed, else their first error lines."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *tests], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT),
                               "KVMTRACE_REQUIRE_KERNEL": "1"})
    if proc.returncode == 0:
        return None
    errors = [ln[1:].strip() for ln in proc.stdout.splitlines() if ln.startswith("E ")]
    return " | ".join(errors[:4])[:600] or proc.stdout.strip().splitlines()[-1]


def soak_tests(doc: str | None, tool: str, needs: str, tests: str,
               scenarios: dict[str, str]) -> int:
    """A soak whose scenarios are tests: ``--runs N`` (default 20) runs of each test
    ``tests + scenarios[name]`` (``--only NAME ...`` picks some), each in its own pytest
    process; prints per scenario the runs and every anomaly (a failed run, with its first
    assertion lines). Returns the exit status: 1 if any run failed."""
    ap = parser(doc, runs=20)
    ap.add_argument("--only", nargs="*", choices=sorted(scenarios), default=None)
    args = ap.parse_args()
    require_root(tool, needs)
    bad = 0
    for name in args.only or list(scenarios):
        out = repeat(lambda name=name: pytest_once(tests + scenarios[name]), args.runs)
        bad += len(out.failures)
        print(f"{name:>12}: {args.runs} runs, {len(out.failures)} anomalies "
              f"({out.seconds:.0f} s)", flush=True)
        for a in out.failures:
            print(f"{'':>14}{a}", flush=True)
    return 1 if bad else 0


def soak_runs(label: str, runs: int, one: Callable[[Path], tuple[bool, str]]) -> int:
    """Call ``one(folder)`` ``runs`` times, each in a new temporary folder, and print
    ``LABEL run N: ok|FAIL: LINE`` per run as it ends; an exception is a failed run (its
    message the line), not the end of the soak. Returns how many runs failed."""
    failed = 0
    for i in range(runs):
        with tempfile.TemporaryDirectory(prefix="kvmtrace-soak-") as tmp:
            try:
                ok, line = one(Path(tmp))
            except Exception as err:  # noqa: BLE001
                ok, line = False, f"error: {err}"
        failed += not ok
        print(f"{label}run {i + 1}: {'ok' if ok else 'FAIL'}: {line}", flush=True)
    return failed


def seeded_soak(doc: str | None, label: str, first_seed: int,
                one: Callable[[Path, int], tuple[bool, str]]) -> int:
    """A soak's main: ``--runs N`` (20) runs of ``one(folder, seed)`` through
    :func:`soak_runs`, seeds ``first_seed``, ``first_seed + 1``, ...; prints the tally and
    returns the exit status (1 if any run failed)."""
    args = parser(doc, runs=20).parse_args()
    seeds = iter(range(first_seed, first_seed + args.runs))
    failed = soak_runs(label, args.runs, lambda tmp: one(tmp, next(seeds)))
    print(f"{args.runs - failed}/{args.runs} runs passed")
    return 1 if failed else 0


@dataclass(frozen=True)
class Column:
    """One column: its title, the format spec of the title (``>8``) and of a value
    (``>8.1f``; default: the title's)."""

    title: str
    spec: str
    value_spec: str | None = None


class Table:
    """Fixed-width rows: :meth:`header` the titles, :meth:`row` one value per column,
    columns joined by ``sep``."""

    def __init__(self, columns: Sequence[Column], sep: str = " ") -> None:
        self.columns = list(columns)
        self.sep = sep

    def header(self) -> str:
        return self.sep.join(f"{c.title:{c.spec}}" for c in self.columns)

    def row(self, *values: object) -> str:
        if len(values) != len(self.columns):
            raise ValueError(f"{len(values)} values for {len(self.columns)} columns")
        return self.sep.join(f"{v:{c.value_spec or c.spec}}"
                             for c, v in zip(self.columns, values, strict=True))
