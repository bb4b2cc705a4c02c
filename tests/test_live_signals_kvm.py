"""Live commands that do not fall over: signals at any moment, a tracer killed while its
probes load, the command's exit status, names from /proc that are not UTF-8, and a
``-- COMMAND`` that is only a wrapper around the VMM (followed: its process tree).

Every BPF load here is filtered by pid (``-p`` or ``-- COMMAND``). Ground truth comes from
outside kvmtrace: the kernel's /proc (the bytes a process set as its name), the marker
file a command creates when (and only when) it runs, the status ``sh -c 'exit N'`` ends
with, and the pid the built-in VMM writes with ``--pid-file``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmtrace.core.events import Kind
from kvmtrace.source.recording import open_recording
from tests.conftest import kvmtrace_cmd, require_kvm_bpf

LOADED = "Hit Ctrl-C to end."


@pytest.fixture(autouse=True)
def _kvm_bpf() -> None:
    require_kvm_bpf()


def _marker_cmd(marker: Path) -> list[str]:
    """A command whose only effect is to create ``marker``."""
    return [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _read_until(proc: subprocess.Popen[bytes], text: str, timeout: float) -> str:
    """stderr of ``proc`` up to and including the line ``text``."""
    assert proc.stderr is not None
    got = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in got:
        assert time.monotonic() < deadline, got
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, got
        got += chunk
    return got.decode()


@pytest.fixture
def sleeper():
    """A process to filter on that never touches KVM."""
    p = subprocess.Popen(["sleep", "600"])
    yield p
    p.kill()
    p.wait()


# (signal, when): a delay after start in seconds (the probes are then loading), "run"
# (0.3 s after the probes are attached), or "twice" (two signals 10 ms apart while
# running: the second arrives while the first one's detach runs)
MOMENTS = [(signal.SIGTERM, 0.2), (signal.SIGTERM, 1.0), (signal.SIGTERM, "run"),
           (signal.SIGTERM, "twice"), (signal.SIGINT, 0.2), (signal.SIGINT, 1.0),
           (signal.SIGINT, "run"), (signal.SIGINT, "twice")]


@pytest.mark.parametrize("sig, when", MOMENTS, ids=[f"{s.name}-{w}" for s, w in MOMENTS])
def test_top_batch_piped_ends_quietly_on_a_signal(sleeper: subprocess.Popen[bytes],
                                                  sig: signal.Signals, when: object) -> None:
    """``kvmtrace top -b | cat`` stopped by SIGTERM or SIGINT while loading or running:
    no traceback (bcc's "Failed to detach" came from a second signal cutting the detach
    short), status 0 once attached (a handled stop), else the signal's usual status."""
    top = subprocess.Popen(kvmtrace_cmd("top", "-b", "-d", "0.05", "-p", str(sleeper.pid)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cat = subprocess.Popen(["cat"], stdin=top.stdout, stdout=subprocess.DEVNULL)
    assert top.stdout is not None
    top.stdout.close()  # cat alone reads it, as in a shell pipe
    head = ""
    if isinstance(when, float):
        time.sleep(when)
        top.send_signal(sig)
    else:
        head = _read_until(top, LOADED, 120)
        time.sleep(0.3)
        top.send_signal(sig)
        if when == "twice":
            time.sleep(0.01)
            top.send_signal(sig)
    assert top.stderr is not None
    err = head + top.stderr.read().decode()
    rc = top.wait(timeout=30)
    cat.wait(timeout=30)
    assert "Traceback" not in err and "Exception" not in err and "Failed" not in err, err
    assert set(err.splitlines()) <= {LOADED}, err
    if LOADED in err:
        assert rc == 0
    else:  # still loading: the default action of SIGTERM; Ctrl-C's status 130, or killed
        # by SIGINT when it came before Python set its own handler (a slow start on a busy
        # host); or 0 when the signal came between attaching (top's own handler set) and
        # the line printed
        usual = (-signal.SIGTERM,) if sig == signal.SIGTERM else (130, -signal.SIGINT)
        assert rc in (*usual, 0), (rc, err)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_held_command_never_runs_when_record_dies_while_loading(tmp_path: Path,
                                                                sig: signal.Signals) -> None:
    """``record -- CMD`` killed while its probes load: CMD, held before exec, dies with it
    (PR_SET_PDEATHSIG, and end of file on the go pipe) instead of running untraced."""
    marker, out = tmp_path / "marker", tmp_path / "r.kvt"
    # --no-cache: the probes are compiled (seconds), so the signal comes while they load;
    # from the probe cache they would be attached in about 0.3 s
    rec = subprocess.Popen(kvmtrace_cmd("record", "--no-cache", "-o", str(out), "--",
                                        *_marker_cmd(marker)),
                           stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not _children(rec.pid):
        assert time.monotonic() < deadline and rec.poll() is None
        time.sleep(0.01)
    (held,) = _children(rec.pid)
    time.sleep(0.3)
    rec.send_signal(sig)
    rec.wait(timeout=30)
    # the recording is created once the probes are attached, just before the release:
    # none means the kill came while they loaded
    assert not out.exists()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{held}") and "Z" not in _state(held):
        assert time.monotonic() < deadline, f"held child {held} still alive"
        time.sleep(0.05)
    time.sleep(0.5)
    assert not marker.exists()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


@pytest.mark.parametrize("script, status", [("exit 3", 3), ("exit 0", 0),
                                            ("kill -KILL $$", 128 + 9)])
def test_record_exits_with_the_command_status(tmp_path: Path, script: str,
                                              status: int) -> None:
    """Like ``perf record``: the recording is saved, then the exit status is the command's
    (128 + N when signal N killed it)."""
    out = tmp_path / "r.kvt"
    p = subprocess.run(kvmtrace_cmd("record", "-o", str(out), "--", "sh", "-c", script),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == status, p.stderr
    assert "Traceback" not in p.stderr
    src = open_recording(out)
    assert not src.truncated
    assert sum(len(b) for b in src.batches()) == 0


def test_top_exits_with_the_command_status(tmp_path: Path) -> None:
    p = subprocess.run(kvmtrace_cmd("top", "-b", "-d", "0.1", "--", "sh", "-c", "exit 5"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 5, p.stderr
    assert "Traceback" not in p.stderr


# Run in a process whose kernel name (comm) and command line carry bytes that are not
# UTF-8: set the name with prctl(PR_SET_NAME), then run the built-in VMM in-process.
_BAD_NAME = (
    "import ctypes,sys\n"
    "ctypes.CDLL(None).prctl(15, ctypes.c_char_p(b'vmm\\xff\\xfe'), 0, 0, 0)\n"
    "from kvmtrace.cli import main\n"
    "sys.exit(main(sys.argv[2:-1]))\n"
)


def test_top_json_survives_a_vmm_named_in_bytes_that_are_not_utf8(tmp_path: Path) -> None:
    """A VMM whose comm and cmdline are not valid UTF-8 (b"vmm\\xff\\xfe" set with
    PR_SET_NAME; a b"\\xff" argument): ``top -b --json`` shows it with the bytes
    escaped (the kernel's bytes, as Python's backslashreplace spells them) and goes on."""
    pid_file = tmp_path / "pid"
    vmm = subprocess.Popen([sys.executable.encode(), b"-c", _BAD_NAME.encode(), b"kvmtrace",
                            b"workload", b"--duration", b"6", b"--start-delay-ms", b"3000",
                            b"--pid-file", str(pid_file).encode(), b"--exit-every", b"16",
                            b"--pages", b"200", b"--name", b"w", b"arg\xff"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text().endswith("\n"):
            assert time.monotonic() < deadline and vmm.poll() is None
            time.sleep(0.02)
        assert int(pid_file.read_text()) == vmm.pid
        assert Path(f"/proc/{vmm.pid}/comm").read_bytes() == b"vmm\xff\xfe\n"  # the kernel's
        assert b"arg\xff" in Path(f"/proc/{vmm.pid}/cmdline").read_bytes()
        p = subprocess.run(kvmtrace_cmd("top", "-b", "--json", "-d", "0.5", "-n", "14",
                                        "-p", str(vmm.pid)),
                           capture_output=True, text=True, timeout=120)
    finally:
        vmm.wait(timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(lines) == 14
    comms = {v["comm"] for line in lines for v in line["vms"] + line["idle_vms"]}
    assert comms == {"vmm\\xff\\xfe"}, comms


def wrapper_cmd(kind: str, truth: Path, pid_file: Path, *workload: str) -> list[str]:
    """A ``-- COMMAND`` that is only a wrapper around the VMM (the built-in one, its --json
    report to ``truth``): ``sh`` forks it (``sh -c 'VMM >truth; true'``), ``python`` forks
    a child that runs that shell (the VMM is a grandchild, after fork + exec twice)."""
    vmm = " ".join(kvmtrace_cmd("workload", "--json", "--pid-file", str(pid_file), *workload))
    shell = ["sh", "-c", f"{vmm} >{truth}; true"]
    if kind == "sh":
        return shell
    return [sys.executable, "-c", "import os,sys\n"
            "pid=os.fork()\n"
            "if pid==0: os.execvp(sys.argv[1],sys.argv[1:])\n"
            "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid,0)[1]))\n", *shell]


WRAPPED = ("--vcpus", "2", "--ring-bytes", "4096", "--pages", "300", "--exit-every", "4")


@pytest.mark.parametrize("kind", ["sh", "python"])
def test_record_follows_the_vmm_below_a_wrapper(tmp_path: Path, kind: str) -> None:
    """``record -- WRAPPER`` whose child (or grandchild) is the VMM: the probes follow
    COMMAND's process tree, so the recording holds the VMM's events: per ring, its pushes
    equal the pages the VMM harvested and its soft-full exits the VMM's own count (its
    --json report); nothing of a VMM outside the tree running at the same time (its
    --pid-file), nor of any other process, and no warning."""
    pid_file, out, truth = tmp_path / "pid", tmp_path / "r.kvt", tmp_path / "truth.json"
    outside_pid = tmp_path / "outside"
    outside = subprocess.Popen(kvmtrace_cmd("workload", "--duration", "3", "--pages", "200",
                                            "--pid-file", str(outside_pid)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p = subprocess.run(kvmtrace_cmd("record", "-o", str(out), "--",
                                        *wrapper_cmd(kind, truth, pid_file, *WRAPPED,
                                                     "--passes", "20")),
                           capture_output=True, text=True, timeout=120)
    finally:
        assert outside.wait(timeout=60) == 0
    assert int(outside_pid.read_text()) == outside.pid
    assert p.returncode == 0, p.stderr
    assert "warning" not in p.stderr and "Traceback" not in p.stderr
    t = json.loads(truth.read_text())
    assert t["pid"] == int(pid_file.read_text())
    ev = open_recording(out).read_all()
    assert set(ev["pid"].tolist()) == {t["pid"]}
    for ring in t["rings"]:
        mine = ev[ev["ring"] == ring["index"]]
        assert (mine["kind"] == Kind.PUSH).sum() == ring["harvested"]
        assert (mine["kind"] == Kind.EXIT).sum() == ring["soft_full_exits"]
    assert (ev["kind"] == Kind.RESET_LAT).sum() == t["resets"]


@pytest.mark.parametrize("kind", ["sh", "python"])
def test_top_follows_the_vmm_below_a_wrapper(tmp_path: Path, kind: str) -> None:
    """``top -b --json -- WRAPPER``: as for record, the last interval's cumulative counts
    of each ring equal the VMM's own (pushes = harvested pages, soft-full exits, resets),
    only the VMM's rings are shown, and no warning."""
    pid_file, truth = tmp_path / "pid", tmp_path / "truth.json"
    p = subprocess.run(kvmtrace_cmd("top", "-b", "--json", "-d", "0.5", "--",
                                    *wrapper_cmd(kind, truth, pid_file, *WRAPPED,
                                                 "--duration", "1.5")),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "warning" not in p.stderr and "Traceback" not in p.stderr
    t = json.loads(truth.read_text())
    assert t["pid"] == int(pid_file.read_text())
    last = json.loads(p.stdout.splitlines()[-1])
    rings = {r["index"]: r for r in last["rings"]}
    assert {r["pid"] for r in last["rings"]} == {t["pid"]}
    assert sorted(rings) == [r["index"] for r in t["rings"]] == [0, 1]
    for ring in t["rings"]:
        assert rings[ring["index"]]["pushes"] == ring["harvested"]
        assert rings[ring["index"]]["soft_full_exits"] == ring["soft_full_exits"]
        assert rings[ring["index"]]["resets"] == ring["reset_events"]


def test_followed_processes_leave_the_map_when_they_exit(tmp_path: Path) -> None:
    """The probes' set of followed tasks (map ``followed``) holds the VMM below the wrapper
    while it runs (its --pid-file) and is empty once the whole tree has exited: every
    thread's and process's entry is removed, so a reused pid is not followed."""
    from kvmtrace.bpf.loader import Probes
    from kvmtrace.host.child import PausedChild

    pid_file, truth = tmp_path / "pid", tmp_path / "truth.json"
    child = PausedChild(wrapper_cmd("python", truth, pid_file, *WRAPPED, "--duration", "2",
                                    "--start-delay-ms", "1000"))
    try:
        with Probes("top", pid=child.pid, follow=True) as probes:
            assert probes.follow
            followed = probes._bpf[b"followed"]  # the map itself: no accessor needed
            child.release()
            deadline = time.monotonic() + 60
            while not pid_file.exists() or not pid_file.read_text().endswith("\n"):
                assert time.monotonic() < deadline and child.poll() is None
                time.sleep(0.02)
            vmm = int(pid_file.read_text())
            assert vmm in {k.value for k in followed.keys()}
            assert child.proc.wait(timeout=60) == 0
            assert json.loads(truth.read_text())["pid"] == vmm
            assert not list(followed.keys())
    finally:
        child.stop(kill=True)


@pytest.mark.parametrize("times", [1, 2])
def test_record_stopped_by_sigterm_saves_and_exits_0(tmp_path: Path, times: int) -> None:
    """``record -- CMD`` stopped by SIGTERM (once, or twice 10 ms apart) while recording:
    the recording is complete, CMD is ended by record (so its status is not record's), exit
    0, one summary line and nothing else."""
    out = tmp_path / "r.kvt"
    rec = subprocess.Popen(kvmtrace_cmd("record", "-o", str(out), "--", "sleep", "60"),
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in tmp_path.glob("r.kvt.*.partial")):
        assert time.monotonic() < deadline and rec.poll() is None  # written as .partial
        time.sleep(0.05)
    time.sleep(0.3)
    for _ in range(times):
        rec.send_signal(signal.SIGTERM)
        time.sleep(0.01)
    _, err = rec.communicate(timeout=60)
    assert rec.returncode == 0, err
    (line,) = err.splitlines()
    assert line.startswith("recorded 0 events"), err
    assert not open_recording(out).truncated
