#!/usr/bin/env python3
"""The recorder's own CPU per event, stage by stage, against an anchor revision's code.

``kvmtrace record`` spends, per event: copying it out of its CPU's ring, the merge
(kvmtrace/bpf/percpu.py EventMerge), the record loop's look at each batch (VM names, push
count, ring sizes, stuck rings: kvmtrace/commands/record.py) and the .kvt encoding
(kvmtrace/source/recording_codec.py). This replays the per-CPU batches of a real run --
the arrays each poll read from each CPU's ring and the merge's time limit, captured by
``--capture`` from ``kvmtrace record -- workload`` (the bench_record workload: 2 vCPUs,
tight loop, reaper, 1 MiB rings) -- through this tree's code and through the code of
``--anchor REV`` (its percpu.py, recording_codec.py and record.py loaded side by side with
``git show``), alternating, ``--rounds`` times, and prints each stage's ns per event and
the ratio new / anchor (median and spread over the rounds). The outputs must agree: the
merged streams event for event, the encoded blocks byte for byte.

``--live N`` instead records real runs, this tree's ``kvmtrace record`` and the anchor's (a
``git archive`` copy) alternated, and compares the recorder's CPU per event (schedstat) and
the guest's own write rate.

    .venv/bin/python tools/bench_recorder.py --capture /tmp/run.npz [--seconds 4]  # root
    .venv/bin/python tools/bench_recorder.py --input /tmp/run.npz [--anchor REV] [--rounds 7]
    .venv/bin/python tools/bench_recorder.py --live 6 [--seconds 4] [--anchor REV]  # root
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from _common import ROOT, parser, reaper_workload, require_root

from kvmtrace.analysis.stuck import EventStuck
from kvmtrace.core.events import EVENT_DTYPE, Kind, concat_records, ring_sizes
from kvmtrace.core.sources import SourceMeta
from kvmtrace.source import recording

#: the modules whose code is timed, as (module name, path in the tree)
MODULES = {"percpu": ("kvmtrace.bpf", "kvmtrace/bpf/percpu.py"),
           "codec": ("kvmtrace.source", "kvmtrace/source/recording_codec.py"),
           "record": ("kvmtrace.commands", "kvmtrace/commands/record.py"),
           "recording": ("kvmtrace.source", "kvmtrace/source/recording.py")}


def capture(out: Path, seconds: float) -> None:
    """Record the bench workload for ``seconds`` and save every merge call's inputs: the
    per-CPU batches (``events``, ``counts[call, cpu]``) and limits (-1: final)."""
    from kvmtrace.bpf import percpu
    from kvmtrace.commands.record import record

    calls: list[tuple[list[np.ndarray], int | None]] = []
    real = percpu.EventMerge.merge

    def spy(self: Any, parts: Any, limit: int | None, sources: Any = None) -> np.ndarray:
        srcs = range(len(parts)) if sources is None else sources
        by_cpu: dict[int, list[np.ndarray]] = {}  # a ring read in two pieces: one part
        for p, s in zip(parts, srcs, strict=True):
            by_cpu.setdefault(s, []).append(p)
        ncpu = max(by_cpu, default=-1) + 1
        calls.append(([concat_records(by_cpu[c]) if c in by_cpu else np.empty(0, EVENT_DTYPE)
                       for c in range(ncpu)], limit))
        return real(self, parts, limit, sources)

    percpu.EventMerge.merge = spy  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        summary = record(Path(tmp) / "run.kvt", command=reaper_workload(seconds),
                         quiet=True, stdout=subprocess.DEVNULL)
    percpu.EventMerge.merge = real  # type: ignore[method-assign]
    ncpus = max(len(p) for p, _ in calls)
    counts = np.zeros((len(calls), ncpus), np.int64)
    flat = []
    for i, (parts, _) in enumerate(calls):
        for c, p in enumerate(parts):
            counts[i, c] = len(p)
            flat.append(p)
    limits = np.array([-1 if lim is None else lim for _, lim in calls], np.int64)
    np.savez(out, events=np.concatenate(flat).view(np.uint8), counts=counts, limits=limits)
    print(f"captured {counts.sum()} events in {len(calls)} reads of {ncpus} CPU rings "
          f"({summary.events} recorded, {summary.lost} lost) to {out}")


def load_capture(path: Path) -> list[tuple[list[np.ndarray], int | None]]:
    z = np.load(path)
    ev = z["events"].view(EVENT_DTYPE)
    calls = []
    at = 0
    for row, lim in zip(z["counts"], z["limits"], strict=True):
        parts = []
        for n in row:
            parts.append(ev[at : at + n])
            at += n
        calls.append((parts, None if lim < 0 else int(lim)))
    return calls


def anchor_modules(rev: str, tmp: Path) -> dict[str, ModuleType]:
    """The modules of :data:`MODULES` as of ``rev``, loaded under private names inside
    their packages (so their relative imports resolve to this tree's other modules)."""
    out = {}
    for key, (package, path) in MODULES.items():
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"],
                             capture_output=True, text=True, check=True).stdout
        file = tmp / f"_anchor_{key}.py"
        file.write_text(src)
        name = f"{package}._anchor_{key}"
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        out[key] = mod
    out["recording"].encode_events = out["codec"].encode_events  # the anchor's own codec
    return out


def tree_modules() -> dict[str, ModuleType]:
    from kvmtrace.bpf import percpu
    from kvmtrace.commands import record
    from kvmtrace.source import recording_codec
    return {"percpu": percpu, "codec": recording_codec, "record": record,
            "recording": recording}


def merger(mods: dict[str, ModuleType]) -> Callable[[list[np.ndarray], int | None], Any]:
    """The module's merge as the recorder calls it: the records taken from the captured
    arrays as the reader takes them from its rings (copied out first where the code did
    that); batches as records, or as columns (ColumnMerge)."""
    mod = mods["percpu"]
    if hasattr(mod, "ColumnMerge"):
        return mod.ColumnMerge().merge
    m = mod.EventMerge()
    if "sources" in inspect.signature(m.merge).parameters:  # merges from the rings' memory
        return m.merge
    return lambda parts, lim: m.merge([mod._copy(p) for p in parts], lim)


def merged(mods: dict[str, ModuleType],
           calls: list[tuple[list[np.ndarray], int | None]]) -> list[Any]:
    """Each read's merged batch."""
    merge = merger(mods)
    return [merge(parts, lim) for parts, lim in calls]


def records(batch: Any) -> np.ndarray:
    return batch if isinstance(batch, np.ndarray) else batch.events()


def blocks(stream: list[np.ndarray], size: int = 1 << 16) -> list[np.ndarray]:
    """The writer's blocks of a merged stream (as RecordingWriter cuts it)."""
    ev = np.concatenate(stream)
    return [ev[i : i + size] for i in range(0, len(ev), size)]


def looked(mods: dict[str, ModuleType], stream: list[np.ndarray]) -> tuple[Any, ...]:
    """The record loop's look at each merged batch (VM names, pushes, stuck rings, ring
    sizes): its totals."""
    rec = mods["record"]
    sizes: dict[tuple[int, int], int] = {}
    if hasattr(rec, "_Look"):
        look = rec._Look()
        for batch in stream:
            if len(batch):
                sizes.update(look.batch(batch)[1])
        return look.pushes, sorted(look.names.seen), look.stuck.stuck(), sizes
    # the loop body as it was before _Look
    names, stuck, pushes = rec._Names(), EventStuck(), 0
    for batch in stream:
        if len(batch):
            names.learn(batch)
            pushes += int(np.count_nonzero(np.ascontiguousarray(batch["kind"]) == Kind.PUSH))
            stuck.feed(batch)
            sizes.update(ring_sizes(batch))
    return pushes, sorted(names.seen), stuck.stuck(), sizes


def pipeline(mods: dict[str, ModuleType], calls: list[tuple[list[np.ndarray], int | None]],
             path: Path) -> int:
    """The whole recorder on the captured reads, as ``kvmtrace record`` runs it: each read
    merged, looked at by the loop and written (RecordingWriter, encoding with ``mods``'s
    codec) as it comes, so every stage works on what the one before just produced."""
    rec = mods["record"]
    merge = merger(mods)
    path.unlink(missing_ok=True)
    with mods["recording"].RecordingWriter(path, SourceMeta(kind="bench")) as w:
        look = rec._Look() if hasattr(rec, "_Look") else None
        names, stuck = rec._Names(), EventStuck()
        for parts, lim in calls:
            batch = merge(parts, lim)
            if not len(batch):
                continue
            if look is not None:
                look.batch(batch)
            else:
                names.learn(batch)
                int(np.count_nonzero(np.ascontiguousarray(batch["kind"]) == Kind.PUSH))
                stuck.feed(batch)
                ring_sizes(batch)
            w.write(batch)
    return path.stat().st_size


def events_blocks(path: Path) -> list[bytes]:
    """The EVENTS blocks of a recording, header and payload, as written."""
    rec = recording.open_recording(path)
    out = []
    with open(path, "rb") as f:
        for offset, _ in rec._index:
            f.seek(offset)
            head = f.read(recording.BLOCK_HEADER.size)
            out.append(head + f.read(recording.BLOCK_HEADER.unpack(head)[4]))
    return out


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.process_time_ns()
    fn()
    return time.process_time_ns() - t0


def _cpu_ns(pid: int) -> int:
    """CPU time of process ``pid``'s threads so far, ns (/proc/PID/task/*/schedstat: the
    scheduler's own count, not 10 ms ticks)."""
    total = 0
    for f in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(f.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def live_once(tree: Path, out: Path, seconds: float) -> tuple[int, int, float]:
    """``kvmtrace record -o OUT -- workload`` from the checkout ``tree``: (the recorder's
    CPU ns from its output file appearing to its workload's exit, events recorded, the
    guest's page writes per second per vCPU from the workload's own report)."""
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "kvmtrace", "record", "-o", str(out), "--",
           *reaper_workload(seconds)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree)
    partial = out.with_name(f"{out.name}.{proc.pid}.partial")
    cpu0 = cpu1 = None
    kids: list[str] = []
    while proc.poll() is None:
        if cpu0 is None:
            if partial.exists() and partial.stat().st_size:
                cpu0 = _cpu_ns(proc.pid)
        else:
            try:
                now = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            except OSError:
                now = []
            if kids and not set(kids) & set(now):
                break  # the workload has exited: the recorder drains and closes from here
            kids = kids or now
            cpu1 = _cpu_ns(proc.pid)
        time.sleep(0.02)
    report, err = proc.communicate(timeout=120)
    if proc.returncode != 0 or cpu0 is None or cpu1 is None:
        raise SystemExit(f"record from {tree}: exit {proc.returncode}: {err.decode()[-300:]}")
    rings = json.loads(report)["rings"]
    rate = statistics.mean(r["pages_written"] / (r["run_ns"] / 1e9) for r in rings)
    return cpu1 - cpu0, recording.open_recording(out).events, rate


def live(rev: str, rounds: int, seconds: float, tmp: Path) -> None:
    """The recorder's own CPU per event on real runs, this tree against ``rev``'s (a copy
    made with git archive), alternated."""
    anchor = tmp / "anchor"
    anchor.mkdir()
    data = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kvmtrace"],
                          capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(anchor)], input=data, check=True)
    res: dict[str, list[float]] = {"anchor": [], "new": []}
    rates: dict[str, list[float]] = {"anchor": [], "new": []}
    events: dict[str, int] = {"anchor": 0, "new": 0}
    for r in range(rounds):
        for which in ("anchor", "new") if r % 2 == 0 else ("new", "anchor"):
            cpu, n, rate = live_once(anchor if which == "anchor" else ROOT, tmp / "run.kvt",
                                     seconds)
            res[which].append(cpu / max(1, n))
            rates[which].append(rate)
            events[which] += n
    ratios = [x / y for x, y in zip(res["new"], res["anchor"], strict=True)]
    print(f"live: kvmtrace record -- workload (2 vCPUs, tight loop, reaper, 1 MiB rings, "
          f"{seconds} s), {rounds} rounds alternated; the recorder's CPU while the "
          f"workload ran (schedstat), per event recorded; a shared host")
    for which in ("anchor", "new"):
        v = res[which]
        print(f"  {which:<7} ns/event median {statistics.median(v):6.0f}  "
              f"({min(v):.0f} .. {max(v):.0f}), {events[which] / rounds:,.0f} events a run, "
              f"guest writes/s/vCPU median {statistics.median(rates[which]):,.0f}")
    print(f"  new/anchor median {statistics.median(ratios):.3f}  spread "
          f"{min(ratios):.3f} .. {max(ratios):.3f}")


def main() -> int:
    ap = parser(__doc__, rounds=7)
    ap.add_argument("--capture", type=Path, metavar="NPZ", help="record a run into NPZ (root)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--input", type=Path, metavar="NPZ", help="a capture to replay")
    ap.add_argument("--anchor", default="9338c90",
                    help="revision whose code is the anchor (default: the tree before the "
                    "recorder's CPU work of issue K)")
    ap.add_argument("--live", type=int, default=0, metavar="ROUNDS",
                    help="also record real runs (root), this tree's recorder and the anchor's")
    args = ap.parse_args()
    if args.live:
        require_root("bench_recorder --live", "BPF and /dev/kvm", kvm=True)
        with tempfile.TemporaryDirectory(prefix="bench_recorder_") as d:
            live(args.anchor, args.live, args.seconds, Path(d))
        if not args.input:
            return 0
    if args.capture:
        require_root("bench_recorder --capture", "BPF and /dev/kvm", kvm=True)
        capture(args.capture, args.seconds)
        return 0
    if not args.input:
        ap.error("give --capture NPZ or --input NPZ")
    with tempfile.TemporaryDirectory(prefix="bench_recorder_") as d:
        return replay_capture(args, Path(d))


def replay_capture(args: argparse.Namespace, tmp: Path) -> int:
    """The capture's reads through both trees' code, stage by stage (see the docstring)."""
    calls = load_capture(args.input)
    n = sum(len(p) for parts, _ in calls for p in parts)
    new, old = tree_modules(), anchor_modules(args.anchor, tmp)
    # the outputs agree: merged stream event for event, blocks byte for byte
    s_new, s_old = merged(new, calls), merged(old, calls)
    a, b = (np.concatenate([records(x) for x in got]) for got in (s_new, s_old))
    assert len(a) == n and a.tobytes() == b.tobytes(), "merged streams differ"
    blk = blocks([a])
    for ev in blk:
        assert new["codec"].encode_events(ev) == old["codec"].encode_events(ev), "blocks differ"
    assert looked(new, s_new) == looked(old, s_old), "the loop's totals differ"
    pipeline(new, calls, tmp / "new.kvt")
    pipeline(old, calls, tmp / "old.kvt")
    got = [recording.open_recording(tmp / f"{k}.kvt").read_all() for k in ("new", "old")]
    assert got[0].tobytes() == got[1].tobytes() == a.tobytes(), "recordings differ"
    assert events_blocks(tmp / "new.kvt") == events_blocks(tmp / "old.kvt"), "blocks differ"
    stages: dict[str, Callable[[dict[str, ModuleType]], Callable[[], Any]]] = {
        "read+merge": lambda m: lambda: merged(m, calls),
        "loop": lambda m: lambda: looked(m, s_new if m is new else s_old),
        "encode": lambda m: lambda: [m["codec"].encode_events(ev) for ev in blk],
        "all": lambda m: lambda: pipeline(m, calls, tmp / "run.kvt"),
    }
    results: dict[str, dict[str, list[float]]] = {s: {"new": [], "old": []} for s in stages}
    for r in range(args.rounds):
        for stage, make in stages.items():
            for which, mods in (("new", new), ("old", old)) if r % 2 else (("old", old),
                                                                          ("new", new)):
                results[stage][which].append(timed(make(mods)) / n)
    print(f"{n} events in {len(calls)} reads; {args.rounds} rounds alternated; anchor "
          f"{args.anchor}; CPU time of this process (a shared host: other load moves both)")
    print(f"{'stage':<10}{'anchor ns/ev':>13}{'new ns/ev':>11}{'new/anchor':>12}  spread")
    for stage, res in results.items():
        ratios = [x / y for x, y in zip(res["new"], res["old"], strict=True)]
        print(f"{stage:<10}{statistics.median(res['old']):>13.1f}"
              f"{statistics.median(res['new']):>11.1f}{statistics.median(ratios):>12.3f}"
              f"  {min(ratios):.3f} .. {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
