"""The interactive ``kvmtrace top``: key handling (:class:`TopState`, pure) and a thin curses
loop (:func:`run_curses`) that draws :func:`~kvmtrace.views.top_render.render_top` lines.

Keys: ``q`` quit; ``h``/``?`` help; ``s``/``>`` and ``S``/``<`` next/previous sort column;
``R`` reverse order; ``H`` the histogram pane (:mod:`.top_hist`) in place of the table
(again: back); ``r`` reset counters (the cumulative columns restart at 0: a baseline
snapshot is subtracted in the view, the kernel maps are untouched); ``p`` type a VMM pid to
show (Enter applies, 0 = all, Esc cancels); space refreshes now.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..analysis.rates import Interval, compute_interval, subtract
from ..core.counters import Snapshot
from ..core.sources import SnapshotSource
from .top_hist import top_hist_lines
from .top_render import HEADER_LINES, SORT_KEYS, column_span, next_sort_key, render_top

__all__ = ["TopState", "run_curses"]

_ESC = 27
_ENTER = (10, 13)
_BACKSPACE = (8, 127, 263)  # ^H, DEL, curses.KEY_BACKSPACE


@dataclass
class TopState:
    """What the keys change. ``handle_key`` returns False to quit."""

    sort_key: str = "push"
    reverse: bool = False
    pid: int = 0
    show_help: bool = False
    show_hist: bool = False  # the histogram pane (key H) in place of the ring table
    reset_requested: bool = False
    refresh_requested: bool = False
    pid_entry: str | None = None  # digits typed after "p", None when not prompting

    def handle_key(self, ch: int) -> bool:
        if self.pid_entry is not None:
            self._pid_key(ch)
            return True
        if self.show_help:
            self.show_help = False
            return ch not in (ord("q"), ord("Q"))
        key = chr(ch) if 0 <= ch < 256 else ""
        if key in ("q", "Q"):
            return False
        if key in ("h", "?"):
            self.show_help = True
        elif key in ("s", ">"):
            self.sort_key = next_sort_key(self.sort_key, 1)
        elif key in ("S", "<"):
            self.sort_key = next_sort_key(self.sort_key, -1)
        elif key == "H":
            self.show_hist = not self.show_hist
        elif key == "R":
            self.reverse = not self.reverse
        elif key == "r":
            self.reset_requested = True
        elif key == "p":
            self.pid_entry = ""
        elif key == " ":
            self.refresh_requested = True
        return True

    def _pid_key(self, ch: int) -> None:
        assert self.pid_entry is not None
        if ch in _ENTER:
            self.pid = int(self.pid_entry or "0")
            self.pid_entry = None
        elif ch == _ESC:
            self.pid_entry = None
        elif ch in _BACKSPACE:
            self.pid_entry = self.pid_entry[:-1]
        elif ord("0") <= ch <= ord("9") and len(self.pid_entry) < 10:
            self.pid_entry += chr(ch)

    @property
    def status(self) -> str | None:
        if self.pid_entry is not None:
            return f"show pid (Enter applies, 0 = all, Esc cancels): {self.pid_entry}"
        return None


def run_curses(
    source: SnapshotSource,
    interval_s: float,
    *,
    state: TopState | None = None,
    source_label: str = "live",
    hooks: dict[str, str] | None = None,
    clock: Callable[[Snapshot], str] | None = None,
    end_status: Callable[[], str | None] | None = None,
    count: int | None = None,
    mode: str = "full",
) -> int:
    """Run the interactive view until ``q`` (or ``count`` refreshes). Returns 0.
    ``mode`` ``light``: the header says pushes/used are known at resets only."""
    import curses

    st = state or TopState()
    if st.sort_key not in SORT_KEYS:
        st.sort_key = "push"

    def loop(scr: curses.window) -> int:
        try:
            curses.curs_set(0)
        except curses.error:
            pass
        prev = cur = source.snapshot()
        base: Snapshot | None = None
        iv = compute_interval(None, cur, pid=st.pid)
        due = time.monotonic() + interval_s
        refreshes = 0
        while True:
            _draw(scr, iv, st, source_label, hooks, clock(cur) if clock else "",
                  end_status() if end_status else None, mode)
            scr.timeout(max(0, int((due - time.monotonic()) * 1000)))
            ch = scr.getch()
            if ch != -1 and not st.handle_key(ch):
                return 0
            if st.reset_requested:
                st.reset_requested = False
                base = cur
            if time.monotonic() >= due or st.refresh_requested:
                st.refresh_requested = False
                new = source.snapshot()
                if new.time_ns != cur.time_ns:  # a finished replay keeps its last interval
                    prev, cur = cur, new
                due = time.monotonic() + interval_s
                refreshes += 1
            iv = _interval(prev, cur, base, st.pid)
            if count is not None and refreshes >= count:
                return 0

    return int(curses.wrapper(loop))


def _interval(prev: Snapshot, cur: Snapshot, base: Snapshot | None, pid: int) -> Interval:
    if base is not None:
        prev, cur = subtract(prev, base), subtract(cur, base)
    return compute_interval(prev, cur, pid=pid)


def _draw(
    scr: object,
    iv: Interval,
    st: TopState,
    label: str,
    hooks: dict[str, str] | None,
    clock: str,
    end_status: str | None,
    mode: str = "full",
) -> None:
    import curses

    assert isinstance(scr, curses.window)
    height, width = scr.getmaxyx()
    lines = render_top(
        iv,
        width - 1,
        height,
        st.sort_key,
        reverse=st.reverse,
        clock=clock,
        source=label,
        hooks=hooks,
        status=st.status or end_status,
        show_help=st.show_help,
        pid=st.pid,
        mode=mode,
    )
    hist = st.show_hist and not st.show_help
    if hist:
        lines = lines[:HEADER_LINES] + top_hist_lines(iv, width - 1)
    scr.erase()
    for y, line in enumerate(lines[:height]):
        attr = curses.A_REVERSE if y == HEADER_LINES and not hist else curses.A_NORMAL
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if line.startswith("STUCK:") or (y > HEADER_LINES and first.endswith("!")):
            attr = curses.A_BOLD  # a stuck ring (top_render marks it with "!")
        try:
            scr.addnstr(y, 0, line.ljust(width - 1) if attr else line, width - 1, attr)
        except curses.error:
            pass
    span = None if hist else column_span(width - 1, st.sort_key)
    if span and HEADER_LINES < height:
        try:
            scr.chgat(HEADER_LINES, span[0], span[1] - span[0], curses.A_REVERSE | curses.A_BOLD)
        except curses.error:
            pass
    scr.refresh()
