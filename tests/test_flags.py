"""Every flag of every subcommand is checked before anything happens.

Table-driven: each case runs the real CLI (``python -m kvmtrace``) with one bad value and
checks exit status 2, exactly one stderr line naming the flag and carrying the fix, no
traceback, nothing on stdout, and that nothing was written or started: no output file
appears in the test's directory (an existing ``-o`` recording keeps its bytes and gets no
``.old``), and a ``-- COMMAND`` that would create a marker file never ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SAMPLES, kvmtrace_cmd

FTRACE = str(SAMPLES / "ftrace-1vcpu-8192B-800pages.txt")
BIG_PID = str(2**40)
OLD = b"an older recording\n"


def _missing_pid() -> str:
    """A pid below pid_max that no process has."""
    top = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(top - 1, 1, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return str(pid)
    raise AssertionError("every pid is taken")


MISSING = _missing_pid()
# "{marker}" is replaced by a command that creates the marker file when it runs
MARK = "{marker}"

# (subcommand and arguments, text the one error line must contain)
CASES: list[tuple[list[str], str]] = [
    # top
    (["top", "-b", "-d", "nan"], "-d"),
    (["top", "-b", "-d", "inf"], "-d"),
    (["top", "-b", "-d", "-1"], "-d"),
    (["top", "-b", "-d", "0"], "-d"),
    (["top", "-b", "-n", "0"], "-n"),
    (["top", "-b", "-n", "x"], "-n"),
    (["top", "-b", "-p", "0"], "-p 0"),
    (["top", "-b", "-p", "-5"], "-p -5"),
    (["top", "-b", "-p", BIG_PID], f"-p {BIG_PID}"),
    (["top", "-b", "-p", "x"], "-p x"),
    (["top", "-b", "-p", MISSING], f"-p {MISSING}: no such process"),
    (["top", "-b", "-s", "bogus"], "sort"),
    (["top", "-b", "--hook", "bogus"], "--hook"),
    (["top", "-b", "--prometheus", ":99999"], "--prometheus"),
    (["top", "-b", "--ring-entries", "256"], "--replay"),
    (["top", "-b", "--replay", FTRACE, "--ring-entries", "300"], "--ring-entries 300"),
    (["top", "-b", "--replay", FTRACE, "--light"], "--light"),
    (["top", "-b", "--"], "nothing after --"),
    (["top", "-b", "-p", "1", "--", MARK], "-p"),
    (["top", "-b", "--replay", FTRACE, "--", MARK], "--replay"),
    (["top", "-b", "--", "/nonexistent/vmm"], "command not found"),
    (["top", "--bogus"], "--bogus"),
    # record
    (["record", "-o", "{out}", "--duration", "nan"], "--duration nan"),
    (["record", "-o", "{out}", "--duration", "inf"], "--duration inf"),
    (["record", "-o", "{out}", "--duration", "-1"], "--duration -1"),
    (["record", "-o", "{out}", "--duration", "0"], "--duration 0"),
    (["record", "-o", "{out}", "--duration", "x"], "--duration x"),
    (["record", "-o", "{out}", "-p", "0"], "-p 0"),
    (["record", "-o", "{out}", "-p", "-1"], "-p -1"),
    (["record", "-o", "{out}", "-p", BIG_PID], f"-p {BIG_PID}"),
    (["record", "-o", "{out}", "-p", MISSING], f"-p {MISSING}: no such process"),
    (["record", "-o", "{out}", "--ringbuf-pages", "3"], "--ringbuf-pages 3"),
    (["record", "-o", "{out}", "--ringbuf-pages", "0"], "--ringbuf-pages 0"),
    (["record", "-o", "{out}", "--ringbuf-pages", str(2**40)], "--ringbuf-pages"),
    (["record", "-o", "{out}", "--hook", "bogus"], "--hook"),
    (["record", "-o", "{out}", "--"], "nothing after --"),
    (["record", "-o", "{out}", "-p", "1", "--", MARK], "-p and -- COMMAND"),
    (["record", "-o", "{out}", "--", "/nonexistent/vmm"], "command not found"),
    (["record", "-o", "{tmp}/no/dir/r.kvt", "--", MARK], "does not exist"),
    (["record", "-o", "{tmp}", "--", MARK], "is a directory"),
    (["record", "--", MARK], "-o"),
    # replay
    ([ "replay", FTRACE, "--window", "nan"], "--window nan"),
    (["replay", FTRACE, "--window", "inf"], "--window inf"),
    (["replay", FTRACE, "--window", "0"], "--window 0"),
    (["replay", FTRACE, "--window", "1e-9"], "--window 1e-9"),
    (["replay", FTRACE, "--window", "-1"], "--window -1"),
    (["replay", FTRACE, "--top", "0"], "--top 0"),
    (["replay", FTRACE, "--top", "x"], "--top x"),
    (["replay", FTRACE, "--reserved", "100"], "--reserved 100"),
    (["replay", FTRACE, "--simulate-ring-entries", "100"], "--simulate-ring-entries 100"),
    (["replay", FTRACE, "--ring-entries", "300"], "--ring-entries 300"),
    (["replay", FTRACE, "--ring-entries", "nan"], "--ring-entries nan"),
    (["replay", FTRACE, "--ring-bytes", "100"], "--ring-bytes 100"),
    (["replay", FTRACE, "--ring-bytes", str(2**40)], "--ring-bytes"),
    (["replay", FTRACE, "--window", "0", "--dump-harvest", "{out}"], "--window 0"),
    (["replay"], "file"),
    # export
    (["export", FTRACE, "--perfetto", "{out}", "--counter-interval-us", "nan"],
     "--counter-interval-us nan"),
    (["export", FTRACE, "--perfetto", "{out}", "--counter-interval-us", "inf"],
     "--counter-interval-us inf"),
    (["export", FTRACE, "--perfetto", "{out}", "--counter-interval-us", "-1"],
     "--counter-interval-us -1"),
    (["export", FTRACE, "--parquet", "{out}", "--row-group-rows", "0"], "--row-group-rows 0"),
    (["export", FTRACE, "--parquet", "{out}", "--row-group-rows", str(2**40)],
     "--row-group-rows"),
    (["export", FTRACE, "--parquet", "{out}", "--ring-entries", "0"], "--ring-entries 0"),
    (["export", FTRACE, "--parquet", "{out}", "--perfetto", "{out}.json"], "--perfetto"),
    (["export", FTRACE], "--parquet"),
    # compare
    (["compare", FTRACE, FTRACE, "--threshold", "nan"], "--threshold nan"),
    (["compare", FTRACE, FTRACE, "--threshold", "inf"], "--threshold inf"),
    (["compare", FTRACE, FTRACE, "--threshold", "-5"], "--threshold -5"),
    (["compare", FTRACE, FTRACE, "--ring-bytes", "3"], "--ring-bytes 3"),
    (["compare", FTRACE], "new"),
    # workload (with --pid-file and --dump-harvest: neither may be written)
    (["workload", "--duration", "nan"], "--duration nan"),
    (["workload", "--duration", "inf"], "--duration inf"),
    (["workload", "--duration", "0"], "--duration 0"),
    (["workload", "--duration", "-1"], "--duration -1"),
    (["workload", "--vcpus", "0"], "--vcpus 0"),
    (["workload", "--vcpus", "65"], "--vcpus 65"),
    (["workload", "--vcpus", "x"], "--vcpus x"),
    (["workload", "--pages", "0"], "--pages 0"),
    (["workload", "--pages", str(2**40)], "--pages"),
    (["workload", "--ring-bytes", "1000"], "--ring-bytes 1000"),
    (["workload", "--ring-entries", "100"], "--ring-entries 100"),
    (["workload", "--passes", "0"], "--passes 0"),
    (["workload", "--exit-every", "-1"], "--exit-every -1"),
    (["workload", "--seed", "-1"], "--seed -1"),
    (["workload", "--reaper-ms", "0"], "--reaper-ms 0"),
    (["workload", "--reaper-ms", "nan"], "--reaper-ms nan"),
    (["workload", "--harvest-delay-us", "inf"], "--harvest-delay-us inf"),
    (["workload", "--start-delay-ms", "-1"], "--start-delay-ms -1"),
    (["workload", "--vms", "0"], "--vms 0"),
    (["workload", "--vm-cycles", "0"], "--vm-cycles 0"),
    (["workload", "--migrate-ms", "0"], "--migrate-ms 0"),
    (["workload", "--migrate-ms", "nan"], "--migrate-ms nan"),
    (["workload", "--pattern", "bogus"], "--pattern"),
    (["workload", "--harvest", "bogus"], "--harvest"),
    (["workload", "--passes", "2", "--duration", "1"], "exclusive"),
    (["workload", "--ring-bytes", "4096", "--ring-entries", "256"], "exclusive"),
    (["workload", "--name", ""], "--name"),
    # doctor
    (["doctor", "--bogus"], "--bogus"),
    # no subcommand or an unknown one
    (["frobnicate"], "frobnicate"),
]


def _argv(args: list[str], tmp: Path) -> list[str]:
    out: list[str] = []
    for a in args:
        if a == MARK:
            out += [sys.executable, "-c", f"open({str(tmp / 'marker')!r}, 'w')"]
        else:
            out.append(a.format(out=tmp / "out.kvt", tmp=tmp))
    if args[0] == "workload":
        out += ["--pid-file", str(tmp / "pid"), "--dump-harvest", str(tmp / "harvest.json")]
    return out


@pytest.mark.parametrize("args, needle", CASES,
                         ids=[" ".join(a).replace(FTRACE, "FTRACE") for a, _ in CASES])
def test_bad_flag_one_line_exit_2_nothing_done(tmp_path: Path, args: list[str],
                                               needle: str) -> None:
    out = tmp_path / "out.kvt"
    out.write_bytes(OLD)  # an earlier recording that a refused run must leave alone
    p = subprocess.run(kvmtrace_cmd(*_argv(args, tmp_path)), cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stdout == ""
    (line,) = p.stderr.splitlines()
    assert line.startswith("kvmtrace"), line
    assert ": error: " in line and "(fix: " in line, line
    assert needle in line, line
    # nothing written, nothing started: only the earlier recording, unchanged
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out.kvt"]
    assert out.read_bytes() == OLD


def test_argparse_errors_name_the_fix() -> None:
    """argparse's own messages (wrong type, missing value, unknown flag) are one line."""
    p = subprocess.run(kvmtrace_cmd("record", "-o"), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2
    assert p.stderr == ("kvmtrace record: error: argument -o/--output: expected one argument "
                        "(fix: give the flag a value; see kvmtrace record --help)\n")
