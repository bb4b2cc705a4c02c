"""tools/setup.sh's link_on_path (the /usr/local/bin/kvmtrace link), run from the script's
own text in a temporary folder: announced when it changes something, idempotent, and never
replacing another kvmtrace."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import ROOT


def _function() -> str:
    text = (ROOT / "tools" / "setup.sh").read_text()
    found = re.search(r"^link_on_path\(\) \{\n.*?^\}\n", text, re.M | re.S)
    assert found, "link_on_path() not found in tools/setup.sh"
    return found.group(0)


def link(target: Path, at: Path) -> list[str]:
    """Run link_on_path TARGET AT; its output lines."""
    script = ('say() { echo "setup: $*"; }\nchanged() { echo "setup: changed: $*"; }\n'
              f'{_function()}link_on_path "$1" "$2"\n')
    proc = subprocess.run(["bash", "-c", script, "setup", str(target), str(at)],
                          capture_output=True, text=True, check=True)
    assert proc.stderr == ""
    return proc.stdout.splitlines()


def test_links_once_then_changes_nothing(tmp_path: Path) -> None:
    target, at = tmp_path / "co" / ".venv" / "bin" / "kvmtrace", tmp_path / "bin" / "kvmtrace"
    assert link(target, at) == [f"setup: changed: linked {at} -> {target} "
                                "(so sudo kvmtrace ... finds it)"]
    assert at.is_symlink() and Path(at.readlink()) == target
    assert link(target, at) == [f"setup: on PATH: {at} -> {target}"]
    assert Path(at.readlink()) == target


def test_leaves_another_kvmtrace_alone(tmp_path: Path) -> None:
    target = tmp_path / "co" / ".venv" / "bin" / "kvmtrace"
    other = tmp_path / "other" / ".venv" / "bin" / "kvmtrace"
    other.parent.mkdir(parents=True)
    other.write_text("#!/bin/sh\n")
    at = tmp_path / "kvmtrace"
    at.write_text("#!/bin/sh\necho mine\n")
    (out,) = link(target, at)
    assert out.startswith(f"setup: not linking {at}: another file is there")
    assert not at.is_symlink() and at.read_text() == "#!/bin/sh\necho mine\n"
    at.unlink()
    at.symlink_to(other)  # a working checkout elsewhere
    (out,) = link(target, at)
    assert out.startswith(f"setup: not linking {at}: it exists and points to {other}")
    assert Path(at.readlink()) == other
    at.unlink()
    at.symlink_to(tmp_path / "nowhere")  # dangling, but not a checkout's venv
    (out,) = link(target, at)
    assert "not linking" in out and Path(at.readlink()) == tmp_path / "nowhere"


def test_replaces_a_dangling_link_into_a_removed_checkout(tmp_path: Path) -> None:
    target = tmp_path / "co" / ".venv" / "bin" / "kvmtrace"
    gone = tmp_path / "gone" / ".venv" / "bin" / "kvmtrace"
    at = tmp_path / "kvmtrace"
    at.symlink_to(gone)
    assert link(target, at) == [f"setup: changed: replaced {at} (a dangling link to {gone}) "
                                f"with a link to {target}"]
    assert Path(at.readlink()) == target
