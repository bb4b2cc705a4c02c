"""``top --replay`` on every core (kvmtrace.analysis.spread_snapshots, ``top -j N``) against
one process: the same snapshots, window by window, and the same bytes out of ``kvmtrace top
-b --replay`` (text and --json) on the old recordings of tests/data/recordings, the shared
text samples, streams with several VMs, ring sizes and latencies, and a real recording of
the built-in VMM (whose own counts the last window must show); a damaged recording fails
with the one-process error at the same window; Ctrl-C, SIGTERM and ``q`` end the workers."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, kvmtrace_cmd, record_workload, require_kvm_bpf
from fuzzing import miscount_block, spoil_block
from test_replay_agree import PID, VM, random_stream
from test_replay_columns import write

from kvmtrace.analysis.aggregate import Aggregator, ReplaySource
from kvmtrace.analysis.replay import parallel
from kvmtrace.analysis.spread_snapshots import SpreadReplaySource, open_replay
from kvmtrace.core.counters import Snapshot
from kvmtrace.core.events import Kind
from kvmtrace.core.sources import SourceMeta
from kvmtrace.source.detect import open_source
from kvmtrace.source.recording import open_recording
from kvmtrace.testing.synth import workload_stream

OLD = sorted((ROOT / "tests" / "data" / "recordings").glob("*.kvt"))
SAMPLES = ROOT / "tests" / "data" / "samples"


def snapshots(src: ReplaySource | SpreadReplaySource) -> list[Snapshot]:
    out = [src.snapshot()]
    while not src.done:
        out.append(src.snapshot())
    out.append(src.snapshot())  # done: the final state again
    src.close()
    return out


def same_snapshots(path: Path, step_ns: int, jobs: int, pid: int = 0) -> list[Snapshot]:
    """Every window of one process and of ``jobs`` processes (which must have spread)."""
    one = snapshots(ReplaySource(open_recording(path), step_ns, pid=pid))
    spread = open_replay(open_recording(path), step_ns, pid=pid, jobs=jobs, min_events=0)
    assert isinstance(spread, SpreadReplaySource) and 2 <= spread.jobs <= jobs
    many = snapshots(spread)
    assert many == one
    assert [list(s.rings) for s in many] == [list(s.rings) for s in one]
    return one


def mixed_stream(seed: int) -> tuple[np.ndarray, SourceMeta]:
    """Two VMs of the workload-like stream (ring sizes, resets and their latencies,
    stalls) in two processes, one VM's ring size told again half-way (a new size for the
    rest of the file), and a VM driven at random (anomalies, sizes not in the meta)."""
    a = workload_stream(30_000, vcpus=3, seed=seed)
    b = workload_stream(20_000, vcpus=2, seed=seed + 1, ring_entries=256)
    b["pid"] += 1
    c = random_stream(seed)
    c["ts"] = c["ts"] % int(a["ts"][-1])
    again = a[a["kind"] == Kind.RING_SIZE][:1].copy()
    again["ts"] = a["ts"][len(a) // 2]
    again["value"] = 1024 * 16
    ev = np.concatenate([a, b, c, again])
    ev = ev[np.argsort(ev["ts"], kind="stable")]
    size = a[a["kind"] == Kind.RING_SIZE][0]
    meta = SourceMeta(kind="test", ring_entries={(int(size["pid"]), int(size["vm"])): 512})
    return ev, meta


@pytest.mark.parametrize("seed", range(3))
def test_windows_of_several_vms_are_the_one_process_ones(tmp_path: Path, seed: int):
    ev, meta = mixed_stream(seed)
    path = write(tmp_path / "m.kvt", ev, meta, block_events=[997, 4096, 300][seed])
    span = int(ev["ts"][-1] - ev["ts"][0])
    for step, jobs in ((span // 7, 2), (span // 200, 3), (span * 2, 2), (span // 5000, 4)):
        snaps = same_snapshots(path, max(1, step), jobs)
        final = snaps[-1]
        assert sum(c.pushes for c in final.rings.values()) == int(
            np.count_nonzero(ev["kind"] == Kind.PUSH))
        assert sum(v.reset_ioctls for v in final.vm_counters.values()) == int(
            np.count_nonzero(ev["kind"] == Kind.RESET_LAT))
    assert {k.pid for k in final.rings} == {PID, 4321, 4322}
    only = same_snapshots(path, max(1, span // 50), 2, pid=PID)  # -p: one VMM process
    assert {k.pid for k in only[-1].rings} == {PID}


@pytest.mark.parametrize("seed", range(4))
def test_random_streams(tmp_path: Path, seed: int):
    """Anomalies, dropped and reordered events; sizes from the meta or not at all."""
    a, b = random_stream(seed + 10), random_stream(seed + 110)
    b["pid"], b["vm"] = PID + 1, VM + 1
    mix = np.concatenate([a, b])
    mix = mix[np.argsort(mix["ts"], kind="stable")]
    meta = SourceMeta(kind="test", ring_entries={(PID, VM): 256} if seed % 2 else {})
    path = write(tmp_path / "r.kvt", mix, meta, block_events=[37, 200][seed % 2])
    span = int(mix["ts"][-1] - mix["ts"][0])
    for jobs in (2, 3):
        same_snapshots(path, max(1, span // 40), jobs)


def test_columns_and_records_count_alike(tmp_path: Path):
    """A recording's stored columns and its records (the path of text traces) give the
    same counters, block by block."""
    ev, meta = mixed_stream(5)
    path = write(tmp_path / "c.kvt", ev, meta, block_events=1500)
    by_cols, by_recs = Aggregator(meta), Aggregator(meta)
    for parts in open_recording(path).column_batches():
        by_cols.feed_columns(parts)
        by_recs.feed(parts.events())
        assert by_cols.snapshot() == by_recs.snapshot()


def test_small_inputs_stay_in_one_process_without_a_cpu_sample(monkeypatch: pytest.MonkeyPatch):
    def no_sample() -> int:
        raise AssertionError("idle CPUs sampled for a small input")

    monkeypatch.setattr(parallel, "default_jobs", no_sample)
    for path in OLD:
        src = open_replay(open_recording(path), 10**6, jobs=None)
        assert isinstance(src, ReplaySource)
        src = open_replay(open_recording(path), 10**6, jobs=1, min_events=0)
        assert isinstance(src, ReplaySource)
    text = open_source(SAMPLES / "ftrace-1vcpu-8192B-800pages.txt", ring_bytes=8192)
    assert isinstance(open_replay(text, 10**6, jobs=4, min_events=0), ReplaySource)


def test_large_inputs_ask_how_many_cpus_are_idle(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    ev = workload_stream(40_000, vcpus=4, seed=2)
    path = write(tmp_path / "l.kvt", ev, block_events=4096)
    asked: list[int] = []
    for idle in (1, 3):
        monkeypatch.setattr(parallel, "default_jobs",
                            lambda idle=idle: asked.append(idle) or idle)
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
        src = open_replay(open_recording(path), 10**7, jobs=None, min_events=len(ev))
        assert asked[-1] == idle
        assert isinstance(src, SpreadReplaySource if idle > 1 else ReplaySource)
        if isinstance(src, SpreadReplaySource):
            assert src.jobs == 3
        snapshots(src)


# -- the CLI ----------------------------------------------------------------------------------
def top(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kvmtrace_cmd("top", "-b", *args), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def same_cli(args: list[str], jobs: tuple[str, ...] = ("1", "2", "3"),
             formats: tuple[tuple[str, ...], ...] = ((), ("--json",))) -> str:
    """``top -b`` prints the same bytes (text and --json; stderr and status too) whatever
    -j; returns the JSON of one process."""
    json_out = ""
    for fmt in formats:
        outs = [top(*args, *fmt, "-j", j) for j in jobs]
        for p in outs:
            assert "Traceback" not in p.stderr
        assert len({(p.returncode, p.stdout, p.stderr) for p in outs}) == 1, outs[0].stderr
        assert outs[0].returncode == 0 and outs[0].stdout
        json_out = outs[0].stdout if fmt else json_out
    return json_out


@pytest.mark.parametrize("old", OLD, ids=[p.name for p in OLD])
def test_old_recordings_cli(old: Path):
    assert isinstance(open_replay(open_recording(old), 10**5, jobs=2, min_events=0),
                      SpreadReplaySource)
    for delay in ("0.0005", "0.003", "1"):
        same_cli(["-d", delay, "--replay", str(old)])
    same_cli(["-d", "0.002", "--hist", "--replay", str(old)], ("1", "2"), ((),))


@pytest.mark.parametrize("name,extra", [
    ("ftrace-1vcpu-8192B-800pages.txt", ["--ring-bytes", "8192"]),
    ("perf-script-3vcpu-4096B-400pages.txt", []),
    ("perf-script-3vcpu-4096B-400pages.txt", ["--ring-entries", "256"]),
])
def test_text_samples_cli(name: str, extra: list[str]):
    same_cli(["-d", "0.001", *extra, "--replay", str(SAMPLES / name)], ("1", "2"))


def test_several_vms_cli(tmp_path: Path):
    ev, meta = mixed_stream(7)
    path = write(tmp_path / "m.kvt", ev, meta, block_events=2048)
    same_cli(["-d", "0.003", "--replay", str(path)], ("1", "2", "4"))
    same_cli(["-d", "0.01", "-p", str(PID), "--replay", str(path)], ("1", "3"))


def test_built_in_vmm_cli(tmp_path: Path):
    """A real recording: 3 vCPUs of the built-in VMM, the reaper harvesting; the last
    window's counters are the VMM's own."""
    require_kvm_bpf()
    run = record_workload(tmp_path, "--vcpus", "3", "--ring-bytes", "4096", "--pages", "700",
                          "--exit-every", "1", "--harvest", "reaper")
    out = same_cli(["-d", "0.001", "--replay", str(run.path)], ("1", "2", "3"))
    import json

    last = json.loads(out.splitlines()[-1])
    rows = sorted(last["rings"], key=lambda r: r["index"])
    truth = run.truth["rings"]
    assert [r["pushes"] for r in rows] == [g["pages_written"] for g in truth] == [700] * 3
    assert [r["soft_full_exits"] for r in rows] == [g["soft_full_exits"] for g in truth]
    assert [r["entries_reset"] for r in rows] == [g["entries_reset"] for g in truth]


def test_jobs_flag_is_checked():
    p = top("-j", "0", "--replay", str(OLD[0]))
    assert p.returncode == 2 and "--jobs 0" in p.stderr and "Traceback" not in p.stderr
    p = top("-j", "2")
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith("kvmtrace top: error: -j/--jobs only applies to --replay")


def damaged(tmp_path: Path, block: int, how: str) -> Path:
    """A recording (rings spread by -j) with block ``block`` damaged: its CRC, or its
    header (CRC intact) declaring 1000 events fewer than its payload holds."""
    ev = workload_stream(40_000, vcpus=3, seed=3)
    path = write(tmp_path / f"d{block}{how}.kvt", ev, block_events=2048)
    off = open_recording(path)._index[block][0]
    if how == "crc":
        spoil_block(path, off)
    else:
        miscount_block(path, off, 1000)
    return path


@pytest.mark.parametrize("block,how", [(0, "crc"), (9, "crc"), (13, "count")])
def test_a_damaged_block_is_the_same_error(tmp_path: Path, block: int, how: str):
    path = damaged(tmp_path, block, how)
    for fmt in ((), ("--json",)):
        outs = [top("-d", "0.001", *fmt, "--replay", str(path), "-j", j) for j in "123"]
        first = outs[0]
        assert first.returncode == 2 and len(first.stderr.splitlines()) == 1
        assert first.stderr.startswith(f"kvmtrace top: error: {path}: ")
        assert ("CRC mismatch" if how == "crc" else "header says") in first.stderr
        assert bool(first.stdout) == (block > 0)  # the windows before the damage
        assert {(p.returncode, p.stdout, p.stderr) for p in outs} == \
            {(first.returncode, first.stdout, first.stderr)}


# -- ending -----------------------------------------------------------------------------------
def workers_of(pid: int) -> list[int]:
    """The children of ``pid`` (from /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(name))
    return out


def gone(pids: list[int], timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids):
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough windows at -d 0.0001 that the replay is still running when it is stopped."""
    ev = workload_stream(400_000, vcpus=4, seed=9)
    return write(tmp_path_factory.mktemp("big") / "big.kvt", ev, block_events=8192)


def running_top(big: Path, stderr: int = subprocess.PIPE
                ) -> tuple[subprocess.Popen[bytes], list[int]]:
    """``top -b --json -j 2 --replay big`` once its first window is out (running; its two
    workers forked): the process and its workers' pids."""
    proc = subprocess.Popen(kvmtrace_cmd("top", "-b", "--json", "-d", "0.00001", "-j", "2",
                                         "--replay", str(big)),
                            stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith(b"{")
    kids = workers_of(proc.pid)
    assert len(kids) == 2
    return proc, kids


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_the_batch_and_its_workers(big: Path, sig: signal.Signals):
    proc, kids = running_top(big)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and b"Traceback" not in err
    assert gone(kids)


def on_pty(argv: list[str], keys: bytes | None, sig: signal.Signals | None
           ) -> tuple[int, bytes, list[int]]:
    """Run the interactive view on a pseudo-terminal (80 x 24); once it has drawn, type
    ``keys`` or send ``sig``; its status, what it drew and its children then."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    screen = b""
    kids: list[int] = []
    end = time.monotonic() + 60
    try:
        while time.monotonic() < end:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                screen += chunk
            if b"vcpu" in screen and not kids:
                kids = workers_of(proc.pid)
                if keys is not None:
                    os.write(master, keys)
                if sig is not None:
                    proc.send_signal(sig)
            if proc.poll() is not None:
                break
        return proc.wait(timeout=30), screen, kids
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


@pytest.mark.parametrize("keys,sig", [(b"q", None), (None, signal.SIGINT),
                                      (None, signal.SIGTERM)])
def test_the_interactive_view_ends_its_workers(big: Path, keys: bytes | None,
                                               sig: signal.Signals | None):
    status, screen, kids = on_pty(kvmtrace_cmd("top", "-d", "0.2", "-j", "2", "--replay",
                                               str(big)), keys, sig)
    assert status == 0 and b"Traceback" not in screen
    assert b"replay" in screen and len(kids) == 2
    assert gone(kids)


def test_the_parent_gone_ends_the_workers(big: Path):
    """A parent killed outright (SIGKILL: nothing of it runs) leaves no worker behind."""
    proc, kids = running_top(big, stderr=subprocess.DEVNULL)
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()
    assert gone(kids, timeout=30)


def test_arenas_reused_many_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """No decoding ahead and small blocks: the arenas hold a few blocks of the hundreds in
    the file, and the windows are still the one-process ones."""
    monkeypatch.setattr(parallel, "AHEAD", 0)
    ev = workload_stream(60_000, vcpus=4, seed=11)
    path = write(tmp_path / "a.kvt", ev, block_events=97)
    span = int(ev["ts"][-1] - ev["ts"][0])
    for jobs in (2, 3):
        same_snapshots(path, span // 30, jobs)
        same_snapshots(path, span // 3000, jobs)


def test_records_with_far_apart_keys(tmp_path: Path):
    """Ring and VM numbers too far apart for one packed key per group: the same counters
    as each ring fed alone."""
    ev, meta = mixed_stream(6)
    ev = ev[ev["kind"] != Kind.RING_SIZE]
    far = ev.copy()
    far["ring"] = np.where(far["ring"] >= 0, far["ring"] * 5000, far["ring"])
    far["vm"] = np.where(far["vm"] == VM, 70000, far["vm"])
    whole = Aggregator()
    whole.feed(far)
    got = whole.snapshot().rings
    for key, counters in got.items():
        alone = Aggregator()
        alone.feed(far[(far["pid"] == key.pid) & (far["vm"] == key.vm)
                       & (far["ring"] == key.ring)])
        assert alone.snapshot().rings == {key: counters}
    assert sum(c.pushes for c in got.values()) == int(np.count_nonzero(far["kind"] == Kind.PUSH))
    assert {k.vm for k in got} >= {70000}


def test_cut_and_trailing_bytes_cli(tmp_path: Path):
    """A recording whose writer was killed (no END block, a torn last block) and one with
    bytes after its END block (a warning on stderr): the same bytes whatever -j."""
    ev, meta = mixed_stream(8)
    path = write(tmp_path / "w.kvt", ev, meta, block_events=3000)
    data = path.read_bytes()
    cut = tmp_path / "cut.kvt"
    cut.write_bytes(data[:len(data) * 2 // 3])
    same_cli(["-d", "0.005", "--replay", str(cut)])
    trailing = tmp_path / "trailing.kvt"
    trailing.write_bytes(data + b"not a block" * 10)
    p = top("-d", "0.005", "--replay", str(trailing), "-j", "2")
    assert p.returncode == 0 and "kvmtrace top: warning: " in p.stderr
    same_cli(["-d", "0.005", "--replay", str(trailing)])


def test_a_worker_killed_is_one_line(big: Path):
    """A worker killed from outside: top ends with one line (no traceback, no worker
    left)."""
    proc, kids = running_top(big)
    os.kill(kids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(b"kvmtrace top: error: a top --replay worker process ended")
    assert gone(kids)
