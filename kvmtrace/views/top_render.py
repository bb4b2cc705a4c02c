"""The ``kvmtrace top`` screen as plain lines: a pure function of an :class:`Interval`.

:func:`render_top` lays out a header, one total row per VM followed by one row per ring
(``struct kvm_dirty_ring`` of one vCPU) and fits any width from 80 columns up (columns of
lower priority are dropped below that; the label column takes extra width). The curses view
and batch text mode both print these lines; tests read them directly.

Units: SIZE, USED, MAXU, LOST and E/RST are ring entries (16-byte ``struct kvm_dirty_gfn``);
FIL% = USED / SIZE; */s are events per second over the interval; MB/s is the dirty rate as
QEMU's calc-dirty-rate counts it (entries pushed per second x 4096 / 2**20: MiB of 4 KiB
pages per second; E/RST yields its place below 86 columns); STL99 and RST99 are the
interval's 99th percentile of the soft-full stall (exit 31 to the next KVM_RUN) and of
KVM_RESET_DIRTY_RINGS, as the upper bound of their power-of-two ns bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..analysis.rates import Interval, RingRates, VmRates
from ..core.kvm_abi import GFN_BYTES, vm_label

__all__ = [
    "SORT_KEYS",
    "WAITING",
    "LOGGING_OFF",
    "HEADER_LINES",
    "HELP_LINES",
    "Column",
    "COLUMNS",
    "render_top",
    "column_span",
    "next_sort_key",
    "fmt_rate",
    "fmt_ns",
    "fmt_count",
    "stuck_line",
]

WAITING = "Waiting for a VM using the dirty ring (KVM_CAP_DIRTY_LOG_RING)..."
#: under a VM with a dirty ring of known size that has pushed nothing yet
LOGGING_OFF = "dirty logging off: starts with a migration, calc-dirty-rate or a dirty limit"
HEADER_LINES = 3  #: lines above the column titles; the titles are line HEADER_LINES


def fmt_count(n: int | None) -> str:
    """An entry count in at most 5 characters ("?" when unknown)."""
    if n is None:
        return "?"
    return str(n) if n < 100_000 else fmt_rate(float(n))


def fmt_rate(x: float) -> str:
    """A rate with 3 significant digits, at most 5 characters: 0.5, 12.3, 123, 1.23k, 12.3M."""
    if x < 9.95:
        return "0" if x == 0 else f"{x:.1f}"
    if x < 999.5:
        return f"{x:.0f}"
    for div, unit in ((1e3, "k"), (1e6, "M"), (1e9, "G"), (1e12, "T")):
        v = x / div
        if v < 9.995:
            return f"{v:.2f}{unit}"
        if v < 99.95:
            return f"{v:.1f}{unit}"
        if v < 999.5:
            return f"{v:.0f}{unit}"
    return f"{x:.0e}"


def fmt_ns(ns: int | None) -> str:
    """A duration in at most 5 characters: 512ns, 1.2us, 16us, 1.2ms, 3.4s; "-" for None."""
    if ns is None:
        return "-"
    for div, unit in ((1, "ns"), (1e3, "us"), (1e6, "ms")):
        v = ns / div
        if v < 9.95 and div > 1:
            return f"{v:.1f}{unit}"
        if v < 999.5:
            return f"{v:.0f}{unit}"
    v = ns / 1e9
    return f"{v:.1f}s" if v < 99.95 else f"{v:.0f}s"


def _pct(r: RingRates) -> str:
    p = r.fill_pct
    if p is None:
        return "?"
    if p >= 999.5:
        return ">999"
    return f"{p:.1f}%" if p < 9.95 else f"{p:.0f}%"


def _epr(r: RingRates) -> str:
    e = r.entries_per_reset
    return "-" if e is None else fmt_rate(e)


def _num(x: float | int | None) -> float:
    return -1.0 if x is None else float(x)


@dataclass(frozen=True)
class Column:
    key: str  #: sort key
    title: str
    width: int
    text: Callable[[RingRates], str]
    value: Callable[[RingRates], float]
    priority: int  #: lower survives longer when the screen is narrow


COLUMNS: tuple[Column, ...] = (
    Column("size", "SIZE", 5, lambda r: fmt_count(r.size), lambda r: _num(r.size), 5),
    Column("used", "USED", 5, lambda r: fmt_count(r.used), lambda r: r.used, 1),
    Column("fill", "FIL%", 4, _pct, lambda r: _num(r.fill_pct), 2),
    Column("max", "MAXU", 5, lambda r: fmt_count(r.max_used), lambda r: r.max_used, 4),
    Column("push", "PUSH/s", 6, lambda r: fmt_rate(r.push_rate), lambda r: r.push_rate, 0),
    Column("mbps", "MB/s", 5, lambda r: fmt_rate(r.dirty_rate_mbps),
           lambda r: r.dirty_rate_mbps, 1),
    Column("exit", "EXIT/s", 6, lambda r: fmt_rate(r.exit_rate), lambda r: r.exit_rate, 1),
    Column("stall", "STL99", 5, lambda r: fmt_ns(r.stall_p99_ns), lambda r: _num(r.stall_p99_ns),
           1),
    Column("reset", "RST/s", 5, lambda r: fmt_rate(r.reset_rate), lambda r: r.reset_rate, 2),
    Column("epr", "E/RST", 5, _epr, lambda r: _num(r.entries_per_reset), 6),
    Column("rlat", "RST99", 5, lambda r: fmt_ns(r.reset_p99_ns), lambda r: _num(r.reset_p99_ns), 3),
    Column("lost", "LOST", 5, lambda r: fmt_count(r.lost), lambda r: r.lost, 1),
)
#: "vm" = natural order (pid, VM fd, ring index); the others sort largest first. "mbps"
#: (PUSH/s in QEMU's unit) comes last, so that the keys before it keep their places.
SORT_KEYS: tuple[str, ...] = ("vm",) + tuple(c.key for c in COLUMNS if c.key != "mbps") + (
    "mbps",)
LABEL_MIN = 12

HELP_LINES = (
    "kvmtrace top: a row per dirty ring (vCPU), a total row per VM (pid:vm-fd comm)",
    "",
    "  s or >  next sort column              S or <  previous sort column",
    "  R       reverse the sort order        r       reset counters (start at 0)",
    "  p       show one VMM pid (0 = all)    h or ?  this help (any key returns)",
    "  q       quit                          space   refresh now",
    "  H       histograms of stall time and reset latency (again: the table)",
    "",
    "SIZE USED MAXU LOST E/RST: entries (16-byte struct kvm_dirty_gfn)",
    "FIL% = USED / SIZE; SIZE ? = unknown (VM created before tracing began)",
    "PUSH/s EXIT/s RST/s: ring pushes, soft-full exits (31), ring resets per second",
    "MB/s: dirty rate as QEMU counts it: PUSH/s x 4 KiB pages, in MiB/s",
    "STL99: p99 of the soft-full stall (exit 31 to the next KVM_RUN), an upper bound:",
    "  the top of the power-of-two bucket holding it (exact: record, replay)",
    "RST99: p99 of KVM_RESET_DIRTY_RINGS, an upper bound likewise",
    "LOST: lost pages = entries overwritten (overflow) + stranded by a stuck ring",
    "vcpuN! / pid:vm!: stuck ring (line 3 says why): stranded = a reset stopped on an",
    "  entry it cleared after an overflow; no_reset_progress = soft-full exits, no resets",
)


def next_sort_key(key: str, step: int = 1) -> str:
    """The sort key ``step`` places after ``key`` in :data:`SORT_KEYS` (wrapping)."""
    i = SORT_KEYS.index(key) if key in SORT_KEYS else 0
    return SORT_KEYS[(i + step) % len(SORT_KEYS)]


def _layout(width: int) -> tuple[int, list[Column]]:
    cols = list(COLUMNS)
    while cols and LABEL_MIN + sum(c.width + 1 for c in cols) > width:
        cols.remove(max(cols, key=lambda c: (c.priority, COLUMNS.index(c))))
    label = max(LABEL_MIN, width - sum(c.width + 1 for c in cols))
    return min(label, 32), cols


def column_span(width: int, sort_key: str) -> tuple[int, int] | None:
    """(start, end) columns of the sort key's title on a screen ``width`` wide, if shown."""
    label, cols = _layout(width)
    pos = label
    if sort_key == "vm":
        return (0, label)
    for c in cols:
        pos += 1
        if c.key == sort_key:
            return (pos, pos + c.width)
        pos += c.width
    return None


def _row(label: str, r: RingRates, lw: int, cols: list[Column]) -> str:
    cells = [label[:lw].ljust(lw)] + [c.text(r)[: c.width].rjust(c.width) for c in cols]
    return " ".join(cells).rstrip()


def _title_row(lw: int, cols: list[Column]) -> str:
    return " ".join(["VM/VCPU".ljust(lw)] + [c.title.rjust(c.width) for c in cols])


def _vm_label(v: VmRates) -> str:
    who = v.name or v.comm
    mark = "!" if v.stuck else ""
    return f"{v.pid or '?'}:{vm_label(v.vm) if v.vm != -1 else '?'}{mark} {who}".rstrip()


def _ring_label(r: RingRates) -> str:
    return f"  vcpu{r.index if r.index >= 0 else '?'}{'!' if r.stuck else ''}"


def stuck_line(iv: Interval) -> str | None:
    """``STUCK: pid:vm vcpuN reason; ...`` for the interval's stuck rings, or None."""
    stuck = [r for r in iv.rings if r.stuck]
    if not stuck:
        return None
    return "STUCK: " + "; ".join(
        f"{r.pid}:{vm_label(r.vm)} vcpu{r.index if r.index >= 0 else '?'} {r.stuck}"
        for r in stuck)


def _hooks_line(hooks: dict[str, str] | None) -> str:
    if not hooks:
        return ""
    kinds: dict[str, list[str]] = {}
    for event, kind in sorted(hooks.items()):
        short = event.removeprefix("kvm_dirty_ring_").removeprefix("kvm_").removeprefix("sys_")
        kinds.setdefault(kind, []).append(short)
    return "hooks: " + "; ".join(f"{k} {' '.join(v)}" for k, v in sorted(kinds.items()))


def _sorted(items: list, key: str, reverse: bool) -> list:
    if key == "vm":
        return sorted(items, key=lambda r: (r.pid, r.vm, r.index), reverse=reverse)
    col = next(c for c in COLUMNS if c.key == key)
    ordered = sorted(items, key=lambda r: (r.pid, r.vm, r.index))
    return sorted(ordered, key=col.value, reverse=not reverse)


def render_top(
    iv: Interval,
    width: int = 80,
    height: int | None = 24,
    sort_key: str = "push",
    *,
    reverse: bool = False,
    clock: str = "",
    source: str = "live",
    hooks: dict[str, str] | None = None,
    status: str | None = None,
    show_help: bool = False,
    pid: int = 0,
    mode: str = "full",
) -> list[str]:
    """The screen for ``iv`` as at most ``height`` lines (None: no limit) of at most
    ``width`` characters. ``clock`` is the time shown in the title, ``source`` names the data
    source, ``hooks`` maps event -> hook kind, ``status`` replaces the hooks line (messages,
    prompts), ``pid`` is the active filter (shown only), ``mode`` ``light`` says that pushes
    and used are known at resets only (``top --light``)."""
    width = max(width, 20)
    total = iv.total()
    arrow = "^" if reverse else "v"
    title = f"kvmtrace top - {clock}" if clock else "kvmtrace top"
    every = fmt_ns(round(iv.interval_s * 1e9)) if iv.interval_s > 0 else "-"
    light = mode == "light"
    title += f"  {source}{' light' if light else ''}  every {every}  sort {sort_key} {arrow}"
    if pid:
        title += f"  pid {pid}"
    summary = (
        f"VMs {len(iv.vms)}  rings {total.rings}  push/s {fmt_rate(total.push_rate)}"
        f"  exits/s {fmt_rate(total.exit_rate)}  resets/s {fmt_rate(total.reset_rate)}"
        f"  lost {fmt_count(total.lost)}  events lost {iv.lost_events}"
    )
    third = status if status is not None else (_hooks_line(hooks) or "h: help  q: quit")
    if light and status is None:
        third = "light: push/used as of the last reset; " + third
    if status is None:
        third = stuck_line(iv) or third
    lines = [title, summary, third]
    label_w, cols = _layout(width)
    lines.append(_title_row(label_w, cols))
    idle = [] if light else iv.idle  # light: pushes are known at resets only
    if show_help:
        body = list(HELP_LINES)
    elif not iv.rings and not idle:
        body = ["", WAITING if not pid else f"Waiting for pid {pid} to use the dirty ring..."]
    else:
        body = []
        rings_by_vm: dict[tuple[int, int], list[RingRates]] = {}
        for r in iv.rings:
            rings_by_vm.setdefault((r.pid, r.vm), []).append(r)
        for v in _sorted(iv.vms, sort_key, reverse):
            body.append(_row(_vm_label(v), v, label_w, cols))
            for r in _sorted(rings_by_vm.get((v.pid, v.vm), []), sort_key, reverse):
                body.append(_row(_ring_label(r), r, label_w, cols))
        for info in idle:
            who = info.name or info.comm
            size = f"ring {(info.ring_bytes or 0) // GFN_BYTES} entries, 0 pushes"
            label = f"{info.pid}:{vm_label(info.vm)} {who}".rstrip()
            body.append(f"{label.ljust(label_w)} {size}")
            body.append(f"  {LOGGING_OFF}")
    if height is not None:
        room = max(height - len(lines), 0)
        if len(body) > room:
            hidden = len(body) - room + 1
            body = body[: max(room - 1, 0)] + [f"... {hidden} more rows (-p PID to filter)"]
            body = body[:room]
    return [line[:width] for line in lines + body]
