"""One vocabulary in what users read: "overwritten" = ring entries lost to an overflow,
"lost events" = events the tracer dropped, "lost pages" = overwritten + stranded entries.

The check runs on the text users get, made the way they get it: ``replay`` and ``compare``
of a recording that has both an overflow (overwritten entries, lost pages) and lost events,
every subcommand's ``--help``, top's help screen and ``record``'s summary line. Every
lower-case word "lost" there must say what was lost: "lost events"/"lost event(s)",
"lost pages"/"lost page(s)", or a kind of event ("lost push event(s)", the "lost push"
column of push events the trace did not show). A bare "lost" (e.g. "5 lost") fails.
Upper-case column titles (top's ``LOST``) are defined in the help's legend, checked here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import kvmtrace_cmd
from test_recording import META

from kvmtrace.cli import COMMANDS
from kvmtrace.commands.record import RecordSummary
from kvmtrace.source.recording import RecordingWriter
from kvmtrace.testing.synth import SynthVm
from kvmtrace.views.top_render import HELP_LINES, SORT_KEYS

LOST_EVENTS = 5
_BARE = re.compile(
    r"\blost\b(?! (?:(?:push|reset) )?(?:events?|event\(s\)|pages?|page\(s\))\b)(?! push\b)")


def bare_lost(text: str) -> list[str]:
    """The lines of ``text`` with a "lost" that does not say what was lost."""
    return [line for line in text.splitlines() if _BARE.search(line)]


def test_the_rule() -> None:
    assert bare_lost("source live, 9 events, 5 lost, span 1 ms") != []
    assert bare_lost("the producer lost 5 events") != []
    assert bare_lost("9 events, 5 lost events; 3 lost page(s); lost push event(s)") == []
    assert bare_lost("lost_pushes lost_page_count") == []


@pytest.fixture(scope="module")
def overflowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recording of one 256-entry ring that takes 300 pushes without an exit (44
    entries overwritten), then a soft-full exit, a harvest and a reset; plus lost events."""
    vm = SynthVm(256)
    vm.ring_size_event()
    vm.run(0, [(0, page) for page in range(300)], exit_every=0)
    assert vm.enter(0)
    vm.harvest()
    vm.reset()
    path = tmp_path_factory.mktemp("vocab") / "overflow.kvt"
    with RecordingWriter(path, META) as w:
        w.write(vm.events())
        w.add_lost(LOST_EVENTS)
    return path


def _out(*args: str) -> str:
    run = subprocess.run(kvmtrace_cmd(*args), capture_output=True, text=True, timeout=120)
    assert run.returncode in (0, 1), run.stderr
    return run.stdout + run.stderr


def test_replay_text(overflowed: Path) -> None:
    text = _out("replay", str(overflowed))
    assert f"{LOST_EVENTS} lost events" in text  # the case is shown, not skipped
    assert "lost pages" in text
    assert bare_lost(text) == []


def test_compare_text(overflowed: Path) -> None:
    text = _out("compare", str(overflowed), str(overflowed))
    assert "lost events" in text
    assert bare_lost(text) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str) -> None:
    text = _out(command, "--help")
    if command == "top":  # the --sort key names are tokens; the lost key is explained
        text = re.sub(r"\s+", " ", text)
        assert "lost = lost pages" in text
        text = text.replace(", ".join(SORT_KEYS), "<keys>").replace("lost = lost", "= lost")
    assert bare_lost(text) == []


def test_top_help_screen_defines_lost() -> None:
    assert bare_lost("\n".join(HELP_LINES)) == []
    assert any(line.startswith("LOST: lost pages") for line in HELP_LINES)


def test_record_summary() -> None:
    line = RecordSummary(events=10, lost=LOST_EVENTS, bytes=100, seconds=1.0, pushes=8,
                         child_status=0).line("out.kvt")
    assert f"{LOST_EVENTS} lost events" in line
    assert bare_lost(line) == []
