"""The source interfaces (kvmtrace.core.sources): every source subclasses EventSource or
SnapshotSource, so callers ask any source for truncated, warnings, unsure, done, close()
and column_batches() without probing; a source that knows nothing of one answers the
base class's default."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmtrace.analysis.aggregate import ReplaySource
from kvmtrace.bpf.event_source import LiveEvents
from kvmtrace.bpf.snapshot_source import LiveSource
from kvmtrace.commands.top import _Latest
from kvmtrace.core.sources import EventSource, SnapshotSource
from kvmtrace.source.detect import open_source
from kvmtrace.source.ftrace import FtraceSource
from kvmtrace.source.perfscript import PerfScriptSource
from kvmtrace.source.recording import Recording, open_recording

RECORDING = Path(__file__).parent / "data" / "recordings" / \
    "workload-2vcpu-4096B-400pages-v1.0.kvt"


def test_every_source_subclasses_its_interface():
    for cls in (Recording, FtraceSource, PerfScriptSource, LiveEvents):
        assert issubclass(cls, EventSource), cls
    for cls in (LiveSource, ReplaySource, _Latest):
        assert issubclass(cls, SnapshotSource), cls
    with pytest.raises(TypeError):
        EventSource()  # type: ignore[abstract]
    with pytest.raises(TypeError):
        SnapshotSource()  # type: ignore[abstract]


def test_a_recording_has_columns_and_says_when_it_is_cut(tmp_path: Path):
    rec = open_recording(RECORDING)
    assert (rec.truncated, rec.warnings, rec.unsure) == (False, [], set())
    cols = rec.column_batches()
    assert cols is not None and sum(c.n for c in cols) == rec.events
    cut = tmp_path / "cut.kvt"
    cut.write_bytes(RECORDING.read_bytes()[:-20])  # the END block torn off
    assert open_recording(cut).truncated
    rec.close()  # the default: nothing held between reads


def test_a_text_trace_has_no_columns(samples: Path):
    src = open_source(samples / "ftrace-1vcpu-8192B-800pages.txt", ring_bytes=8192)
    assert isinstance(src, FtraceSource)
    assert src.column_batches() is None and not src.truncated
    for _ in src.batches():  # warnings and unsure are known once the text is read
        pass
    assert (src.warnings, src.unsure) == ([], set())


def test_a_replay_source_is_done_at_the_end_of_its_file():
    rs = ReplaySource(open_recording(RECORDING), 10**12)
    assert not rs.done and rs.warnings == []
    rs.snapshot()
    rs.snapshot()
    assert rs.done
    rs.close()
    latest = _Latest(rs.meta, rs.snapshot())
    assert not latest.done and latest.warnings == [] and latest.snapshot() is latest.snap
