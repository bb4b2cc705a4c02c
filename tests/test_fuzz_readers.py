"""Fuzzing of every reader (issue 10, item 3), CI-sized: hostile variants of real
recordings, tracefs text and perf script text (tests/fuzzing.py) through replay, replay
--json, top -b --replay and export, in a worker under an address-space cap. Each case must
end with exit 0/1 (what is sound replayed, what was skipped said) or exit 2 and one line;
never a traceback, a hang or a blow-up. The long run: tools/fuzz_readers.py --cases N."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzzing import READERS, Worker, argv_for, case_path, case_strategy
from hypothesis import HealthCheck, given, settings

CASES = int(os.environ.get("KVMTRACE_FUZZ_CASES", "150"))


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.close()


@pytest.mark.parametrize("reader", READERS)
def test_fuzz_reader(reader: str, worker: Worker, tmp_path: Path) -> None:
    path, out = case_path(reader, tmp_path), tmp_path / "case.parquet"

    @settings(max_examples=CASES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case_strategy(reader))
    def one(case: tuple[bytes, str]) -> None:
        data, command = case
        path.write_bytes(data)
        argv = argv_for(command, path, out)
        result = worker.run(argv)
        assert result.problem() is None, (argv, result.problem())

    one()
