"""The wheel users get: built from pyproject.toml, installed into a fresh venv with system
site packages (where bcc lives), run from outside the source tree. It must ship the probes'
C sources (package data) so that ``record`` and ``top`` load them.

Nothing is fetched: the wheel is built with ``--no-build-isolation`` by this interpreter's
setuptools, and installed with ``--no-index``. kvmtrace's dependencies (numpy, pyroute2,
tqdm) are taken from the system site packages when they are there, else from this
interpreter's own installs (symlinked into the new venv through a .pth file), so pip's
resolver still checks that what the wheel declares is satisfied.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, require_kvm_bpf

from kvmtrace.core.events import Kind
from kvmtrace.source.recording import open_recording

PROBE_FILES = {"dirty_ring.bpf.c", "dirty_ring_defs.h", "kvmtrace.h"}
DEPENDENCIES = ("numpy", "pyroute2", "tqdm")
WORKLOAD = ["workload", "--vcpus", "1", "--pages", "500", "--json"]


@dataclass
class Installed:
    venv: Path
    wheel: Path
    cwd: Path  # a folder outside the source tree
    env: dict[str, str]

    def kvmtrace(self) -> str:
        return str(self.venv / "bin" / "kvmtrace")


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _link_dependency(name: str, deps: Path) -> None:
    """Symlink distribution ``name`` of this interpreter (its packages and .dist-info) into
    ``deps``; fail saying why when it is not installed here either."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"kvmtrace needs {name}, which neither the system site packages nor "
                    f"{sys.executable} has; install it (tools/setup.sh --test) and run again")
    base = Path(dist.locate_file(""))
    for top in {Path(f).parts[0] for f in dist.files or () if Path(f).parts[0] != ".."}:
        if not (deps / top).exists() and (base / top).exists():
            (deps / top).symlink_to(base / top)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("wheel")
    # build from a copy, so setuptools' build/ and egg-info stay out of the checkout
    src = tmp / "src"
    shutil.copytree(ROOT / "kvmtrace", src / "kvmtrace",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", "-w", str(tmp / "dist"), str(src)],
         "building the wheel (needs setuptools>=61 in this interpreter)")
    (wheel,) = (tmp / "dist").glob("kvmtrace-*.whl")

    venv = tmp / "venv"
    _run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", "--without-pip",
          str(venv)], "creating a venv (python3-venv installed?)")
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    missing = [d for d in DEPENDENCIES
               if subprocess.run([py, "-c", f"import {d}"], capture_output=True, env=env,
                                 cwd=tmp).returncode != 0]
    if missing:
        purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path("
                                  "'purelib'))"], capture_output=True, text=True, env=env,
                                 check=True).stdout.strip()
        deps = tmp / "deps"
        deps.mkdir()
        for name in missing:
            _link_dependency(name, deps)
        (Path(purelib) / "kvmtrace-test-deps.pth").write_text(f"{deps}\n")
    # this interpreter's pip installs into the new venv (pip >= 22.3: --python)
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-index", "-q",
          str(wheel)], "installing the wheel offline (are numpy, pyroute2 and tqdm importable?)",
         env=env, cwd=tmp)  # no PYTHONPATH: a checkout's egg-info would look installed
    return Installed(venv=venv, wheel=wheel, cwd=tmp, env=env)


def test_wheel_ships_the_probes(installed: Installed) -> None:
    """The installed package finds its probes through importlib.resources, inside the
    venv (not this checkout), and its console script runs."""
    code = ("import kvmtrace, pathlib; from kvmtrace.bpf.loader import probes_dir\n"
            "with probes_dir() as d: print(kvmtrace.__file__); "
            "print(' '.join(sorted(p.name for p in pathlib.Path(d).iterdir())))")
    out = _run([str(installed.venv / "bin" / "python"), "-c", code], "importing kvmtrace",
               env=installed.env, cwd=installed.cwd).stdout.splitlines()
    assert Path(out[0]).is_relative_to(installed.venv), out[0]
    assert set(out[1].split()) == PROBE_FILES
    _run([installed.kvmtrace(), "--help"], "kvmtrace --help", env=installed.env,
         cwd=installed.cwd)


@pytest.mark.kernel
def test_wheel_record_replays_the_workload(installed: Installed) -> None:
    """``record -- workload`` with the installed kvmtrace: the recording holds exactly the
    workload's pushes, and the installed ``replay`` counts them too."""
    require_kvm_bpf()
    k, out = installed.kvmtrace(), installed.cwd / "run.kvt"
    proc = _run([k, "record", "-o", str(out), "--", k, *WORKLOAD], "kvmtrace record",
                env=installed.env, cwd=installed.cwd)
    truth = json.loads(proc.stdout)
    (ring,) = truth["rings"]
    rec = open_recording(out)
    ev = rec.read_all()
    assert (rec.lost, rec.truncated) == (0, False)
    assert int((ev["kind"] == Kind.PUSH).sum()) == ring["pages_written"] == 500
    replay = _run([k, "replay", str(out), "--json"], "kvmtrace replay", env=installed.env,
                  cwd=installed.cwd)
    (rr,) = json.loads(replay.stdout)["rings"]
    assert (rr["pid"], rr["pushes"], rr["harvested"]) == (truth["pid"], 500, ring["harvested"])


@pytest.mark.kernel
def test_wheel_top_follows_the_workload(installed: Installed) -> None:
    """``top -b --json -- workload`` with the installed kvmtrace: the last interval holds
    the workload's pushes exactly; ``-n 1`` stops after one interval."""
    require_kvm_bpf()
    k = installed.kvmtrace()
    proc = _run([k, "top", "-b", "-d", "0.5", "--json", "--", k, *WORKLOAD], "kvmtrace top",
                env=installed.env, cwd=installed.cwd)
    truth = json.loads(proc.stderr)
    (ring,) = json.loads(proc.stdout.splitlines()[-1])["rings"]
    assert (ring["pid"], ring["pushes"]) == (truth["pid"], truth["rings"][0]["pages_written"])
    one = _run([k, "top", "-b", "-n", "1", "-d", "0.5", "--json", "--", k, *WORKLOAD],
               "kvmtrace top -n 1", env=installed.env, cwd=installed.cwd)
    assert len(one.stdout.splitlines()) == 1
    assert json.loads(one.stdout)["schema"] >= 1
