"""Real runs of the built-in VMM traced three ways, for the replay's ground-truth tests and
tools/soak_replay.py: ``kvmtrace record`` (a recording), a tracefs instance filtered to
the workload's pid (the kernel's own text) and ``perf record -a`` + ``perf script`` of its pid
(microsecond timestamps, perf's default). Each returns the workload's ``--json`` object,
its ``--dump-harvest`` object and the trace's path.

The truth a replay is held to, per ring: pushes = ``pages_written``, soft-full exits =
``soft_full_exits``, the lost pages (the ring's ``lost_pages`` when the VMM reports them,
else the written pages of the guest layout less the harvested ones: the same definition)
on single-pass runs (the VMM's lost pages are pages it never harvested at all, which with
several passes is a different quantity) and, on runs that lost nothing, entries reset =
``entries_reset``; over all rings, entries
reset = ``reset_returned`` (what KVM_RESET_DIRTY_RINGS returned: the kernel's count; the
VMM's per-ring ``entries_reset`` counts harvested entries it believes a reset covered,
which after an overflow the kernel's reset walk may not have reached).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textcapture import EVENTS as TEXT_EVENTS
from textcapture import PerfSession, held, tracefs_capture

__all__ = ["AHEAD", "INCOMPLETE", "PAGES_DIFFER", "Run", "clean", "record_run",
           "tracefs_run", "perf_run", "truth_lost_pages", "compare"]

_LOST = re.compile(r"\blost \d+|\d+ lost\b", re.I)  # perf's words for dropped events
EVENTS = TEXT_EVENTS[:3]  # push, reset, exit


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmtrace", *args]


@dataclass
class Run:
    truth: dict[str, Any]
    dump: dict[str, Any]
    path: Path
    fmt: str  # "recording", "ftrace", "perf-script"


def _workload(out: Path, args: tuple[str, ...]) -> list[str]:
    return _cmd("workload", "--json", "--dump-harvest", str(out / "harvest.json"), *args)


def _load(out: Path, path: Path, fmt: str) -> Run:
    truth = json.loads((out / "truth.json").read_text())
    return Run(truth, json.loads((out / "harvest.json").read_text()), path, fmt)


def record_run(out: Path, *args: str, timeout: float = 120) -> Run:
    """``kvmtrace record -o out/run.kvt -- kvmtrace workload ARGS``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.kvt"
    with (out / "truth.json").open("w") as f:
        p = subprocess.run(_cmd("record", "-o", str(path), "--", *_workload(out, args)),
                           stdout=f, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"record failed: {p.stderr[-2000:]}")
    return _load(out, path, "recording")


def tracefs_run(out: Path, *args: str, timeout: float = 120) -> Run:
    """The workload traced by a private tracefs instance, filtered to its pid (threads
    follow through ``event-fork``); the instance's ``trace`` text is the trace. The
    workload waits on stdin, then execs: its pid is filtered and the events enabled
    before it creates a thread."""
    out.mkdir(parents=True, exist_ok=True)
    path, stdout = tracefs_capture(out / "trace.txt", held(_workload(out, args)),
                                   events=EVENTS, timeout=timeout)
    (out / "truth.json").write_text(stdout)
    return _load(out, path, "ftrace")


def perf_run(out: Path, *args: str, timeout: float = 120, tries: int = 5) -> Run:
    """:func:`_perf_once` until perf recorded the run whole: on this host ``perf record``
    now and then gets no tracepoint sample at all (system-wide too, while tracefs and
    BPF see the events), or drops events when the machine is loaded; such a capture is
    retried, never replayed."""
    why = ""
    for k in range(tries):
        try:
            run = _perf_once(out / f"try{k}", *args, timeout=timeout)
        except PerfLost as err:
            why = str(err)
            continue
        if run.path.stat().st_size:
            return run
        perr = (out / f"try{k}" / "perf.err").read_text(errors="replace").strip()
        why = f"perf recorded no event of the workload ({perr[-300:]!r})"
        time.sleep(0.5 * (k + 1))  # another perf session on the host ends first
    raise RuntimeError(f"{tries} perf captures failed, the last: {why}")


class PerfLost(RuntimeError):
    """perf dropped events (its buffers overran): the capture is incomplete."""


def _perf_once(out: Path, *args: str, timeout: float = 120) -> Run:
    """``perf record -a`` of the dirty-ring tracepoints around the workload (events enabled
    through perf's control fifo, and the workload started once perf acknowledged them:
    ``perf record -- CMD`` here sometimes records nothing), then ``perf script`` of the
    workload's pid with microsecond timestamps (perf's default)."""
    with PerfSession(out, EVENTS, mmap_pages=2048) as perf:
        with (out / "truth.json").open("w") as f:
            w = subprocess.run(_workload(out, args), stdout=f, stderr=subprocess.PIPE,
                               text=True, timeout=timeout)
        perr = perf.stop()
    if w.returncode != 0:
        raise RuntimeError(f"workload failed: {w.stderr[-2000:]}")
    if _LOST.search(perr):
        raise PerfLost(f"perf record lost events: {perr[-300:]}")
    if "Captured and wrote" not in perr:
        raise RuntimeError(f"perf record failed: {perr[-2000:]}")
    pid = json.loads((out / "truth.json").read_text())["pid"]
    path = out / "perf.txt"
    script_err = perf.script(path, pid=pid, timeout=timeout)
    if _LOST.search(script_err):  # "Processed N events and lost M chunks!"
        raise PerfLost(f"perf lost events: {script_err.strip()[-300:]}")
    if path.stat().st_size:
        perf.data.unlink()
    return _load(out, path, "perf-script")


def truth_lost_pages(run: Run, index: int) -> list[tuple[int, int]]:
    """The VMM's lost pages of ring ``index`` (sorted): its ``lost_pages`` field, else
    the pages the guest wrote that the harvest never returned."""
    ring = next(r for r in run.truth["rings"] if r["index"] == index)
    if "lost_pages" in ring:
        return sorted((int(s), int(o)) for s, o in ring["lost_pages"])
    from kvmtrace.vmm.guest import GuestLayout

    t = run.truth
    lay = GuestLayout(t["vcpus"], t["pages"], t["pattern"], t["seed"])
    written = {(0, p) for p in lay.written_pages(index, ring["pages_written"])}
    dump = next(r for r in run.dump["rings"] if r["index"] == index)
    return sorted(written - {(int(s), int(o)) for s, o in dump["harvested"]})


def clean(run: Run) -> bool:
    """The VMM lost nothing, saw no livelock, harvested an entry for every write (with
    several passes ``lost_suspected`` only counts pages never harvested at all), and the
    kernel reset every entry it harvested (KVM_RESET_DIRTY_RINGS returned as many: else a
    reset walk stopped short for good, a stuck ring the VMM's own counts do not show)."""
    t = run.truth
    harvested = sum(r["harvested"] for r in t["rings"])
    return (not t["lost_suspected"] and not t["livelock"]
            and t["reset_returned"] == harvested
            and harvested == sum(r["pages_written"] for r in t["rings"]))


#: a capture that does not hold the whole run: not replayed against the truth
INCOMPLETE = "trace incomplete"
#: the start of a note, not a mismatch: the VMM's harvest cursor ran ahead of reset_index
AHEAD = "cursor ahead"
#: the start of a mismatch about which pages (their number agreeing): see :func:`compare`
PAGES_DIFFER = "lost pages differ"


def compare(run: Run) -> tuple[int, list[str]]:
    """Replay ``run``'s trace; (anomalies, mismatches with the VMM's truth as sentences).
    Exact: pushes, entries reset, soft-full exits and lost pages per ring.

    One mismatch starts with :data:`PAGES_DIFFER`: the number of lost pages agrees, not
    which. A VMM harvests an entry (flags DIRTY -> RESET) some time before its
    KVM_RESET_DIRTY_RINGS; a push that overwrites the entry in between leaves the VMM
    with the old page and its cursor past the new one, and no event shows the harvest:
    the trace cannot tell this from an overwrite of an unharvested entry (one page lost
    either way, the old one). Only a ring overflowing while a harvest is in flight (a
    reaper racing a vCPU that outruns it) shows it; a ring overflowing between harvests
    (the tight loop) never does."""
    from kvmtrace.analysis.replay import replay_source
    from kvmtrace.errors import UsageError
    from kvmtrace.source.detect import open_source

    kw = {} if run.fmt == "recording" else {"ring_bytes": run.truth["ring_bytes"]}
    try:
        src = open_source(run.path, **kw)
    except UsageError as err:
        return 0, [f"{run.path.name}: {err}"]
    rep = replay_source(src)
    bad: list[str] = []
    if src.lost:
        bad.append(f"the trace lost {src.lost} events")
    rings = {r.ring[2]: r for r in rep.rings}
    short = [r for r in rep.rings if r.pushes != r.dirty_index or not r.pushes]
    if short or len(rings) != len(run.truth["rings"]):
        # the VM was created while tracing: a whole trace holds every push, up to the last
        # dirty_index; this one does not (perf here sometimes stops or starts delivering
        # tracepoint events part-way without saying so)
        return 0, [f"{INCOMPLETE}: " + ", ".join(
            f"ring {r.ring[2]} {r.pushes} pushes up to dirty_index {r.dirty_index}"
            for r in short)]
    clean_truth = clean(run)
    # the VMM's lost pages are the pages it never harvested at all; with several passes a
    # page harvested once counts as kept even if a later push of it was never collected
    single = run.truth["passes"] == 1 and run.truth["duration_s"] is None
    # and they are the pages a reset never collected only while the VMM's harvest cursor
    # kept step with the kernel's reset_index: every entry it read was reset
    # (KVM_RESET_DIRTY_RINGS returned them all); after an overflow the cursor can run
    # ahead (the harvest ran into the next lap, the reset walk stopped short), and the
    # VMM reads entries no reset ever collects: the replay reports the ring stuck and
    # those entries stranded, the VMM counts their pages as kept
    in_step = run.truth["reset_returned"] == sum(r["harvested"] for r in run.truth["rings"])
    if single and not in_step:
        bad.append(f"{AHEAD}: the VMM read {sum(r['harvested'] for r in run.truth['rings'])}"
                   f" entries, the kernel reset {run.truth['reset_returned']}")
    single = single and in_step
    # the kernel's own count: what KVM_RESET_DIRTY_RINGS returned, summed over the run
    total = sum(r.entries_reset for r in rep.rings)
    if total != run.truth["reset_returned"]:
        bad.append(f"entries reset {total} != the kernel's {run.truth['reset_returned']}")
    for t in run.truth["rings"]:
        r = rings.get(t["index"])
        if r is None:
            bad.append(f"ring {t['index']} missing")
            continue
        checks = [("pushes", r.pushes, t["pages_written"]),
                  ("exits", r.soft_full_exits, t["soft_full_exits"])]
        if clean_truth:  # the VMM's own per-ring count: harvested entries a reset covered
            checks.append(("entries reset", r.entries_reset, t["entries_reset"]))
        for name, mine, theirs in checks:
            if mine != theirs:
                bad.append(f"ring {t['index']} {name} {mine} != {theirs}")
        if not single:
            continue
        lost = [(s, o) for s, o, _ in r.lost_pages]
        want = truth_lost_pages(run, t["index"])
        if r.lost_page_count != len(want):
            bad.append(f"ring {t['index']} lost pages {r.lost_page_count} != {len(want)}")
        elif lost != want:
            bad.append(f"{PAGES_DIFFER}: ring {t['index']}, {len(set(lost) - set(want))} "
                       f"of {len(want)}")
    anomalies = len(rep.anomalies)
    if clean_truth and anomalies:
        kinds = sorted({a.kind.value for a in rep.anomalies})
        bad.append(f"{anomalies} anomalies ({', '.join(kinds)}) on a run that lost nothing")
    return anomalies, bad
