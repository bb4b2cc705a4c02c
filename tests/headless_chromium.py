"""A page opened in a real headless Chromium, driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: Chromium reads NUL-terminated JSON commands on fd 3 and writes
replies and events on fd 4), so a test can load a file, evaluate JavaScript in it and take a
full-page screenshot at one CSS pixel per screen pixel. No websocket, no network."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

BROWSER = "chromium"


def chromium_path() -> str | None:
    """The chromium binary on PATH (Debian's package ``chromium``), else None."""
    return shutil.which(BROWSER)


class Browser:
    """One headless Chromium with one page: ``with Browser() as b: b.open(path)``."""

    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60) -> None:
        self.width, self.height, self.timeout = width, height, timeout
        self._next = 0
        self._buf = b""
        self._events: list[dict[str, Any]] = []
        self.session = ""

    def __enter__(self) -> Browser:
        exe = chromium_path()
        assert exe, "chromium is not installed"
        self._profile = tempfile.TemporaryDirectory(prefix="kvmtrace-chromium-")
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # Chromium's protocol fds: 3 it reads, 4 it writes
            r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w))
            os.dup2(r, 3)  # dup2 makes them inheritable: they survive the exec
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-pipe", "--no-first-run", "--disable-extensions",
             "--force-color-profile=srgb", f"--user-data-dir={self._profile.name}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=fds, close_fds=False)  # our other fds are O_CLOEXEC already
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        self.session = self.call("Target.attachToTarget",
                                 {"targetId": target["targetId"], "flatten": True},
                                 session=False)["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1,
                   "mobile": False})
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call("Browser.close", session=False)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self._profile.cleanup()

    # -- the protocol ----------------------------------------------------------------------
    def call(self, method: str, params: dict[str, Any] | None = None, *,
             session: bool = True) -> dict[str, Any]:
        """Send one command and return its result (AssertionError on a protocol error)."""
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply.get("result", {})
            self._events.append(reply)

    def wait_event(self, method: str) -> dict[str, Any]:
        for i, ev in enumerate(self._events):
            if ev.get("method") == method:
                return self._events.pop(i)
        while True:
            ev = self._read()
            if ev.get("method") == method:
                return ev
            self._events.append(ev)

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            assert time.monotonic() < deadline, "chromium did not answer"
            chunk = os.read(self._from_chrome, 1 << 20)
            assert chunk, f"chromium closed its pipe (exit {self.proc.poll()})"
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    # -- what tests use ------------------------------------------------------------------------
    def open(self, path: Path) -> None:
        """Load ``path`` (a file) and wait for its load event (images decoded)."""
        self.call("Page.navigate", {"url": path.resolve().as_uri()})
        self.wait_event("Page.loadEventFired")

    def eval(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def screenshot(self) -> bytes:
        """PNG of the whole page (beyond the viewport), one pixel per CSS pixel."""
        w, h = self.eval("[document.documentElement.scrollWidth,"
                         " document.documentElement.scrollHeight]")
        res = self.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}})
        return base64.b64decode(res["data"])
