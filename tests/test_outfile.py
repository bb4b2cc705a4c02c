"""Outputs never clobber a user's file (kvmtrace.host.outfile): atomic, 0600, no symlinks
followed, an input never overwritten; exports killed, terminated or out of disk space leave
the old destination as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import kvmtrace_cmd, require
from test_recording import META, synthetic

from kvmtrace.source.recording import RecordingWriter, open_recording


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd(*args), capture_output=True, text=True, timeout=timeout)


def recording(path: Path, n: int = 20_000) -> Path:
    with RecordingWriter(path, META) as w:
        w.write(synthetic(n, vcpus=2, seed=3))
    return path


def one_line(proc: subprocess.CompletedProcess[str], status: int) -> str:
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith((".tmp", ".partial")))


@pytest.mark.parametrize("fmt", ["--parquet", "--perfetto"])
@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "input-via-symlink"])
def test_export_onto_its_input_is_refused(tmp_path: Path, fmt: str, how: str) -> None:
    src = recording(tmp_path / "run.kvt")
    before = sha(src)
    inp, out = src, src
    if how == "symlink":  # the output names the input through a link: refused as a link
        out = tmp_path / "link.kvt"
        out.symlink_to(src.name)
    elif how == "hardlink":
        out = tmp_path / "hard.kvt"
        os.link(src, out)
    elif how == "input-via-symlink":
        inp = tmp_path / "link.kvt"
        inp.symlink_to(src.name)
    line = one_line(run("export", str(inp), fmt, str(out)), 2)
    assert line.startswith(f"kvmtrace export: error: {fmt} {out} ")
    assert ("is a symlink" if how == "symlink" else f"is the input {inp}") in line
    assert sha(src) == before
    assert leftovers(tmp_path) == []


def test_export_to_a_path_not_yet_existing_that_is_the_input(tmp_path: Path) -> None:
    missing = tmp_path / "nope.kvt"
    line = one_line(run("export", str(missing), "--parquet", str(missing)), 2)
    assert f"is the input {missing}" in line
    assert not missing.exists()


def test_replay_dump_harvest_onto_its_input_is_refused(tmp_path: Path) -> None:
    src = recording(tmp_path / "run.kvt")
    before = sha(src)
    hard = tmp_path / "hard.kvt"
    os.link(src, hard)
    for out in (src, hard):
        line = one_line(run("replay", str(src), "--dump-harvest", str(out)), 2)
        assert f"--dump-harvest {out} is the input {src}" in line
    assert sha(src) == before


def test_symlink_destination_is_refused_and_not_followed(tmp_path: Path) -> None:
    """A link planted where the output goes (e.g. by another user in /tmp) pointing into a
    directory it cannot write: nothing is created at its target."""
    src = recording(tmp_path / "run.kvt")
    secret = tmp_path / "private"
    secret.mkdir()
    target = secret / "created-by-root"
    for argv, flag in [(("export", str(src), "--parquet"), "--parquet"),
                       (("export", str(src), "--perfetto"), "--perfetto"),
                       (("replay", str(src), "--dump-harvest"), "--dump-harvest"),
                       (("record", "-o"), "-o"),
                       (("workload", "--dump-harvest"), "--dump-harvest")]:
        link = tmp_path / "out"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        line = one_line(run(*argv, str(link)), 2)
        assert f"{flag} {link} is a symlink" in line, line
        assert not target.exists()
        assert os.readlink(link) == str(target)


@pytest.mark.parametrize("fmt", ["--parquet", "--perfetto"])
def test_exports_are_0600_and_replace_atomically(tmp_path: Path, fmt: str) -> None:
    src = recording(tmp_path / "run.kvt")
    out = tmp_path / "out"
    out.write_text("old")
    os.chmod(out, 0o644)
    old_inode = out.stat().st_ino
    proc = run("export", str(src), fmt, str(out))
    assert proc.returncode == 0, proc.stderr
    st = out.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_ino != old_inode  # a new file renamed over the old one, not rewritten
    assert leftovers(tmp_path) == []
    harvest = tmp_path / "h.json"
    assert run("replay", str(src), "--dump-harvest", str(harvest)).returncode in (0, 1)
    assert stat.S_IMODE(harvest.stat().st_mode) == 0o600


def test_recording_writer_creates_0600_and_leaves_no_partial(tmp_path: Path) -> None:
    path = recording(tmp_path / "w.kvt", 100)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert leftovers(tmp_path) == []
    assert open_recording(path).events == 100


def _slow_export(tmp_path: Path, sig: signal.Signals) -> tuple[Path, Path, str, int]:
    """Start a Perfetto export of a million events (seconds of work), wait until its
    temporary file holds data, then send ``sig``; returns (input, dest, dest's sha, rc)."""
    src = recording(tmp_path / "big.kvt", 1_000_000)
    dest = tmp_path / "out.json"
    dest.write_text("the old export\n")
    before = sha(dest)
    proc = subprocess.Popen(kvmtrace_cmd("export", str(src), "--perfetto", str(dest),
                                         "--counter-interval-us", "0"),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        temps = list(tmp_path.glob(f".out.json.{proc.pid}.*.tmp"))
        if temps and temps[0].stat().st_size > 0:
            break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    return src, dest, before, proc.returncode


def test_export_sigkilled_midway_keeps_the_old_destination(tmp_path: Path) -> None:
    src, dest, before, rc = _slow_export(tmp_path, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert sha(dest) == before
    left = leftovers(tmp_path)  # SIGKILL cannot be caught: the hidden temporary file stays
    assert len(left) == 1 and left[0].startswith(".out.json.")
    small = recording(tmp_path / "small.kvt", 1000)
    proc = run("export", str(small), "--perfetto", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert leftovers(tmp_path) == []  # the next export to it removed the dead one's file
    assert dest.read_text().startswith('{"displayTimeUnit":"ns"')
    assert src.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_export_terminated_midway_removes_its_temporary_file(tmp_path: Path,
                                                             sig: signal.Signals) -> None:
    # a signal this process ignores (e.g. SIGHUP under nohup) stays ignored in the export
    # (exec keeps SIG_IGN), which then leaves it ignored: it finishes as if never sent
    ignored = signal.getsignal(sig) == signal.SIG_IGN
    _, dest, before, rc = _slow_export(tmp_path, sig)
    assert leftovers(tmp_path) == []
    if ignored:
        assert rc == 0
        assert dest.read_text().startswith('{"displayTimeUnit":"ns"')
        return
    assert rc == {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGHUP: 129}[sig]
    assert sha(dest) == before


def test_export_out_of_space_keeps_the_old_destination(tmp_path: Path) -> None:
    """ENOSPC part-way (a 1 MiB tmpfs in a private mount namespace): one line, exit 1, the
    old export byte for byte, no temporary file."""
    unshare = shutil.which("unshare")
    require(unshare is not None and os.geteuid() == 0, "needs root and util-linux unshare")
    src = recording(tmp_path / "big.kvt", 300_000)
    mnt = tmp_path / "small"
    mnt.mkdir()
    keep = tmp_path / "kept"
    export = " ".join(kvmtrace_cmd("export", str(src), "--perfetto", str(mnt / "out.json")))
    script = (f"mount -t tmpfs -o size=1m kvmtrace-test {mnt} && echo old > {mnt}/out.json "
              f"&& {export}; rc=$?; cp -a {mnt} {keep}; exit $rc")
    proc = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=180)
    line = one_line(proc, 1)
    assert line == (f"kvmtrace export: error: cannot write {mnt}/out.json: No space left on "
                    f"device; {mnt}/out.json left as it was (fix: free space or write "
                    "elsewhere)")
    assert sorted(p.name for p in keep.iterdir()) == ["out.json"]
    assert (keep / "out.json").read_text() == "old\n"


@pytest.mark.parametrize("argv", [
    ("--ringbuf-pages", "3", "--", "true"),          # checked by the probes' loader
    ("--duration", "-1", "--", "true"),
    ("--", "/nonexistent/kvmtrace-no-such-command"),  # the command cannot run
])
def test_record_that_fails_leaves_file_and_old_as_they_were(tmp_path: Path,
                                                             argv: tuple[str, ...]) -> None:
    out = recording(tmp_path / "run.kvt", 500)
    old = recording(tmp_path / "run.kvt.old", 700)
    before = (sha(out), sha(old))
    one_line(run("record", "-o", str(out), *argv), 2)
    assert (sha(out), sha(old)) == before
    assert leftovers(tmp_path) == []


def test_record_as_non_root_leaves_file_and_old(tmp_path: Path, kvm) -> None:
    """Not root: refused (probes cannot load) before FILE is touched, even where the user
    may rename files (a world-writable directory)."""
    from test_doctor import ROOT

    setpriv = shutil.which("setpriv")
    require(os.geteuid() == 0 and setpriv is not None, "needs root (to drop it) and setpriv")
    import numpy

    # pytest's tmp_path sits below a directory only root may enter: work in /tmp itself
    base = Path(tempfile.mkdtemp(prefix="kvmtrace-nobody-"))
    try:
        copy = base / "pkg"
        shutil.copytree(ROOT / "kvmtrace", copy / "kvmtrace",
                        ignore=shutil.ignore_patterns("__pycache__"))
        site = Path(numpy.__file__).parents[1]
        for name in ("numpy", "numpy.libs"):
            if (site / name).is_dir():
                shutil.copytree(site / name, copy / name)
        for d, _, files in os.walk(base):
            os.chmod(d, 0o755)
            for f in files:
                os.chmod(os.path.join(d, f), 0o644)
        work = base / "work"
        work.mkdir()
        os.chmod(work, 0o777)  # nobody may rename files here: only kvmtrace's care stops it
        out = recording(work / "run.kvt", 500)
        old = recording(work / "run.kvt.old", 700)
        before = (sha(out), sha(old))
        proc = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
             "-m", "kvmtrace", "record", "-o", str(out), "--", "true"],
            capture_output=True, text=True, timeout=60, cwd="/",
            env={**os.environ, "PYTHONPATH": str(copy)})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "moved" not in proc.stderr
        assert (sha(out), sha(old)) == before
        assert leftovers(work) == []
    finally:
        shutil.rmtree(base)


def test_record_writes_0600_and_keeps_the_old(tmp_path: Path, kvm, bpf_root) -> None:
    out = tmp_path / "run.kvt"
    out.write_bytes(b"an earlier recording")
    workload = kvmtrace_cmd("workload", "--vcpus", "1", "--pages", "10", "--exit-every", "1")
    proc = run("record", "-o", str(out), "--", *workload)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert (tmp_path / "run.kvt.old").read_bytes() == b"an earlier recording"
    assert f"moved the existing {out} to {out}.old" in proc.stderr
    assert leftovers(tmp_path) == []
    assert not open_recording(out).truncated


def test_devices_and_stdout_are_written_in_place(tmp_path: Path) -> None:
    """/dev/null stays the device (a rename would have replaced it with a file, as root);
    /dev/stdout is the pipe it names; stdout appended to the input is refused."""
    src = recording(tmp_path / "run.kvt")
    before = os.lstat("/dev/null")
    assert run("export", str(src), "--perfetto", "/dev/null").returncode == 0
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino
    piped = run("export", str(src), "--perfetto", "/dev/stdout")
    assert piped.returncode == 0, piped.stderr
    file_out = tmp_path / "run.json"
    assert run("export", str(src), "--perfetto", str(file_out)).returncode == 0
    assert piped.stdout == file_out.read_text()
    digest = sha(src)
    with src.open("ab") as tail:
        proc = subprocess.run(kvmtrace_cmd("export", str(src), "--perfetto", "/dev/stdout"),
                              stdout=tail, stderr=subprocess.PIPE, text=True, timeout=60)
    line = one_line(proc, 2)
    assert line.endswith(f"--perfetto /dev/stdout is the input {src}: it would be overwritten "
                         "(fix: write the output to another file)")
    assert sha(src) == digest
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["--parquet", "--perfetto"])
def test_export_fsyncs_the_file_before_the_rename_and_the_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """The real export (``kvmtrace export``, in this process) with os.fsync watched (the
    real fsync still runs): exactly two calls, first on the hidden temporary file holding
    the whole export while the destination is still the old file, then on the directory
    once the destination is that file (same inode). Nothing else changes: the bytes equal
    those of the same export run as a command, mode 0600, no temporary file left."""
    from kvmtrace.cli import main

    src = recording(tmp_path / "run.kvt")
    d = tmp_path / "out"
    d.mkdir()
    out = d / "x"
    out.write_text("old")
    calls: list[tuple[str, int, bytes]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), st.st_ino, out.read_bytes()[:3]))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    assert main(["export", str(src), fmt, str(out)]) == 0
    monkeypatch.setattr(os, "fsync", real)
    assert len(calls) == 2, calls
    (temp, temp_ino, before), (folder, _, after) = calls
    assert Path(temp).parent == d and Path(temp).name.startswith(".x.")
    assert Path(temp).name.endswith(".tmp")
    assert before == b"old"  # the destination untouched while the export is made durable
    assert folder == str(d)
    assert out.stat().st_ino == temp_ino and after == out.read_bytes()[:3] != b"old"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and leftovers(d) == []
    ref = tmp_path / "ref"
    assert run("export", str(src), fmt, str(ref)).returncode == 0
    assert sha(ref) == sha(out)


def test_pid_file_is_not_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``atomic_output(fsync=False)`` (the workload's --pid-file): renamed into place as
    ever, no fsync at all."""
    from kvmtrace.host.outfile import atomic_output

    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", calls.append)
    with atomic_output(tmp_path / "pid", text=True, fsync=False) as f:
        f.file.write("1\n")
    assert calls == [] and (tmp_path / "pid").read_text() == "1\n"
    assert stat.S_IMODE((tmp_path / "pid").stat().st_mode) == 0o600
