"""Progress on stderr (kvmtrace.views.progress): under a pseudo-terminal ``replay``,
``export`` and ``compare`` draw a tqdm bar on stderr and print the very same bytes on stdout
as without one; with stderr a pipe, or with ``--no-progress``, stderr has no progress.
Input: a real recording of the built-in VMM (tests/data/recordings)."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

import pytest
from conftest import kvmtrace_cmd, require

from kvmtrace.source.recording import open_recording
from kvmtrace.views.progress import Progress, ProgressSource, events_total, track

DATA = Path(__file__).parent / "data" / "recordings"
REC = DATA / "workload-2vcpu-4096B-400pages-v1.0.kvt"
EVENTS = 824  # the recording's END block says so (tests/test_format_compat.py)


def _on_pty(argv: list[str], cwd: Path) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pseudo-terminal of 80 x 24 (stdout a pipe): status, stdout,
    and everything written to the terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, cwd=cwd)
    os.close(slave)
    tty = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        tty += chunk
    os.close(master)
    out = proc.stdout.read() if proc.stdout else b""
    return proc.wait(timeout=60), out, tty


def _piped(argv: list[str], cwd: Path) -> tuple[int, bytes, bytes]:
    p = subprocess.run(argv, capture_output=True, cwd=cwd, timeout=60)
    return p.returncode, p.stdout, p.stderr


CASES = {
    "replay": (["replay", str(REC)], "replay: ", b""),
    "replay --hist": (["replay", str(REC), "--hist"], "replay: ", b""),
    "replay --json": (["replay", str(REC), "--json"], "replay: ", b""),
    "export": (["export", str(REC), "--parquet", "out.parquet"], "export: ",
               f"kvmtrace export: {EVENTS} events -> out.parquet\n".encode()),
    "compare": (["compare", str(REC), str(REC)], "compare new: ", b""),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_progress_on_a_terminal_only(case: str, tmp_path: Path) -> None:
    require(importlib.util.find_spec("pyarrow") is not None,
            "pyarrow not installed (tools/setup.sh --test installs it)")
    args, label, quiet_err = CASES[case]
    rc, out, err = _piped(kvmtrace_cmd(*args), tmp_path)
    assert err == quiet_err  # a pipe: no progress at all
    (tmp_path / "out.parquet").unlink(missing_ok=True)
    rc_t, out_t, tty = _on_pty(kvmtrace_cmd(*args), tmp_path)
    assert (rc_t, out_t) == (rc, out)  # stdout byte for byte the same
    text = tty.decode()
    assert f"{label}  0%" in text and f"/{EVENTS} [" in text and "events/s" in text
    # the bar is wiped when done (leave=False), then what stderr says anyway
    assert text.endswith("\r" + quiet_err.decode().replace("\n", "\r\n"))
    (tmp_path / "out.parquet").unlink(missing_ok=True)
    rc_n, out_n, tty_n = _on_pty(kvmtrace_cmd(*args, "--no-progress"), tmp_path)
    assert (rc_n, out_n, tty_n) == (rc, out, quiet_err.replace(b"\n", b"\r\n"))


def test_text_trace_learns_its_total_after_the_first_read(samples: Path,
                                                         tmp_path: Path) -> None:
    """A tracefs text trace is read twice; the bar counts without a total during the first
    read, then with the events that read found (what replay --json says it read)."""
    trace = samples / "ftrace-1vcpu-8192B-800pages.txt"
    rc, out, err = _piped(kvmtrace_cmd("replay", str(trace), "--json"), tmp_path)
    assert err == b""
    events = json.loads(out)["events"]
    rc_t, out_t, tty = _on_pty(kvmtrace_cmd("replay", str(trace), "--json"), tmp_path)
    assert (rc_t, out_t) == (rc, out)
    text = tty.decode()
    assert text.index("replay: 0.00 events [") < text.index("replay:   0%|")
    assert f"/{events} [" in text and text.endswith("\r")


def test_source_wrapper_counts_every_event_per_block() -> None:
    src = open_recording(REC)
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = Progress("t", events_total(src), stream=tty)
        assert bar.active and events_total(src) == EVENTS
        wrapped = track(src, bar)
        assert isinstance(wrapped, ProgressSource)
        cols = wrapped.column_batches()
        assert cols is not None
        assert sum(c.n for c in cols) == EVENTS == bar.done
        assert sum(len(b) for b in track(open_recording(REC), bar).batches()) == EVENTS
        assert bar.done == 2 * EVENTS
        bar.close()
    os.close(master)
    off = Progress("t", 10, enabled=False, stream=open(os.devnull, "w"))
    assert not off.active and track(src, off) is src
