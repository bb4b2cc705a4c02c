"""The terminal log2 histogram (kvmtrace.views.histogram), the exact percentiles of
Durations and the top histogram pane, on hand-made inputs whose answers are written out;
``top -b --hist`` over a real recording, its buckets counted here from the file's events."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import kvmtrace_cmd

from kvmtrace.analysis.rates import compute_interval
from kvmtrace.core.counters import HIST_BUCKETS, RingCounters, RingKey, Snapshot, VmCounters
from kvmtrace.core.events import Kind
from kvmtrace.model.reservoir import DEFAULT_CAP
from kvmtrace.model.results import Durations
from kvmtrace.source.recording import open_recording
from kvmtrace.views.histogram import bucket_range, log2_hist_lines
from kvmtrace.views.top_curses import TopState
from kvmtrace.views.top_hist import top_hist_lines


def test_bucket_ranges_are_the_log2_buckets() -> None:
    assert [bucket_range(i) for i in range(4)] == [(0, 1), (2, 3), (4, 7), (8, 15)]
    assert bucket_range(39) == (1 << 39, (1 << 40) - 1)


def test_lines_exactly_at_40_columns() -> None:
    assert log2_hist_lines([0, 0, 3, 1], "nsecs", 40) == [
        "  nsecs : count    distribution",
        "4 -> 7  : 3        |*******************|",
        "8 -> 15 : 1        |******             |",
    ]


def test_rows_span_first_to_last_nonempty_bucket_and_fit_80_columns() -> None:
    counts = [0] * HIST_BUCKETS
    counts[17], counts[18], counts[19], counts[21] = 5, 100, 3, 1
    lines = log2_hist_lines(counts, "nsecs")
    assert lines == [
        "             nsecs : count    distribution",
        " 131072 -> 262143  : 5        |**                                              |",
        " 262144 -> 524287  : 100      |************************************************|",
        " 524288 -> 1048575 : 3        |*                                               |",
        "1048576 -> 2097151 : 0        |                                                |",
        "2097152 -> 4194303 : 1        |*                                               |",
    ]
    assert {len(line) for line in lines[1:]} == {80}


def test_bucket_zero_wide_counts_and_a_long_unit() -> None:
    lines = log2_hist_lines([123456789, 1], "nanoseconds", 60)
    assert lines == [
        "nanoseconds : count     distribution",
        "     0 -> 1 : 123456789 |**********************************|",
        "     2 -> 3 : 1         |*                                 |",
    ]
    assert {len(line) for line in lines[1:]} == {60}


def test_empty_histogram_draws_nothing() -> None:
    assert log2_hist_lines([0] * HIST_BUCKETS, "nsecs") == []
    assert log2_hist_lines([], "nsecs") == []


def test_durations_percentiles_are_values_not_bucket_bounds() -> None:
    # the example: 4.8 ms stalls whose log2 bucket ends at 2**23 ns (8.4 ms)
    vals = [4_800_000, 4_700_000, 4_900_000, 5_100_000, 200_000, 9_000_000]
    d = Durations()
    for v in vals[:2]:
        d.add(v)
    d.add_many(np.array(vals[2:], dtype=np.uint64))
    s = sorted(vals)
    assert d.quantile_ns(0.5) == s[2] == 4_800_000  # rank ceil(0.5 * 6) = 3
    assert d.quantile_ns(0.99) == s[5] == 9_000_000  # rank ceil(0.99 * 6) = 6
    assert d.quantile_ns(0.0) == 200_000
    assert d.bucket_bound_ns(0.5) == 1 << 23  # what replay printed before: 8.4 ms
    assert (d.count, d.max_ns, d.sampled) == (6, 9_000_000, False)
    assert sorted(d.values.tolist()) == s
    other = Durations()
    other.add(1)
    d.merge(other)
    assert (d.count, d.quantile_ns(0.0), sum(d.hist)) == (7, 1, 7)
    assert Durations().quantile_ns(0.5) is None


def test_durations_many_scalars_flush_in_order() -> None:
    d = Durations()
    vals = list(range(10_000, 0, -1))  # more than PENDING_MAX, one by one
    for v in vals:
        d.add(v)
    assert d.values.tolist() == vals
    assert d.quantile_ns(0.5) == 5_000 and d.quantile_ns(0.99) == 9_900


def _interval() -> object:
    key = RingKey(7, 3, 0)
    old = Snapshot(time_ns=0, rings={key: RingCounters()}, vm_counters={(7, 3): VmCounters()})
    ring = RingCounters(pushes=10, soft_full_exits=3)
    ring.stall_hist[12] = 2  # 4096..8191 ns
    ring.stall_hist[14] = 1
    vmc = VmCounters(reset_ioctls=1)
    vmc.reset_lat_hist[10] = 1
    cur = Snapshot(time_ns=1_000_000_000, rings={key: ring}, vm_counters={(7, 3): vmc})
    return compute_interval(old, cur)


def test_top_pane_labels_upper_bounds() -> None:
    lines = top_hist_lines(_interval(), 80)
    assert lines == [
        "stall time this interval, rings shown (exit 31 to the next KVM_RUN):",
        "  3 stalls: p50<=8.2us p99<=33us (log2 bucket upper bounds)",
        "         nsecs : count    distribution",  # range column: 5 + 4 + 5 wide
        " 4096 -> 8191  : 2        |" + "*" * 52 + "|",  # bar: 80 - 14 - 3 - 8 - 3
        " 8192 -> 16383 : 0        |" + " " * 52 + "|",
        "16384 -> 32767 : 1        |" + "*" * 26 + " " * 26 + "|",
        "",
        "KVM_RESET_DIRTY_RINGS latency this interval, VMs shown:",
        "  1 ioctls: p50<=2.0us p99<=2.0us (log2 bucket upper bounds)",
        "       nsecs : count    distribution",
        "1024 -> 2047 : 1        |" + "*" * 54 + "|",  # bar: 80 - 12 - 3 - 8 - 3
    ]


@pytest.mark.parametrize("keys,shown", [("H", True), ("HH", False), ("Hh", True)])
def test_key_H_toggles_the_pane(keys: str, shown: bool) -> None:
    st = TopState()
    for k in keys:
        assert st.handle_key(ord(k))
    assert st.show_hist is shown


REC = Path(__file__).parent / "data" / "recordings" / "workload-2vcpu-4096B-400pages-v1.0.kvt"


def _counts(vals: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, count) rows from the first to the last non-empty log2 bucket, counted
    here by bit length."""
    b = [max(int(v).bit_length() - 1, 0) for v in vals.tolist()]
    return [((1 << i) if i else 0, (1 << (i + 1)) - 1, b.count(i))
            for i in range(min(b), max(b) + 1)]


def test_top_batch_hist_over_a_real_recording() -> None:
    ev = open_recording(REC).read_all()
    stall = ev["value"][ev["kind"] == Kind.STALL]
    lat = ev["value"][ev["kind"] == Kind.RESET_LAT]
    p = subprocess.run(kvmtrace_cmd("top", "-b", "--hist", "-d", "10", "--replay", str(REC)),
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr) == (0, "")
    lines = p.stdout.splitlines()
    rows = [tuple(int(x) for x in (ln.split()[0], ln.split()[2], ln.split()[4]))
            for ln in lines if " -> " in ln]
    assert rows == _counts(stall) + _counts(lat)
    assert f"  {len(stall)} stalls: p50<=" in p.stdout and f"  {len(lat)} ioctls: p50<=" in p.stdout
    for argv in (("top", "-b", "--json", "--hist", "--replay", str(REC)),
                 ("replay", "--hist", "--json", str(REC))):
        bad = subprocess.run(kvmtrace_cmd(*argv), capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1


def test_durations_beyond_the_cap_keep_a_sample_and_say_so() -> None:
    d = Durations()
    vals = np.arange(DEFAULT_CAP + 10, dtype=np.int64) * 2 + 1  # odd ns only
    d.add_many(vals)
    assert (d.count, len(d.values), d.sampled) == (DEFAULT_CAP + 10, DEFAULT_CAP, True)
    assert d.quantile_ns(0.5) % 2 == 1  # still a value that occurred
    assert (d.max_ns, sum(d.hist)) == (int(vals[-1]), DEFAULT_CAP + 10)  # exact counters
