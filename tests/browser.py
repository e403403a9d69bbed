"""Headless Chromium driven over the DevTools protocol on a pipe (no extra packages).

``open_page(path, screenshot)`` loads a local HTML file with network access blocked and
returns what a browser test asserts on: every image with its ``naturalWidth``, the console
and log errors, and the requests that left the machine.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Chromium's flags: headless, no GPU, nothing fetched in the background, a fresh profile.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1024",
    "--remote-debugging-pipe",
)


def chromium() -> str | None:
    """The Chromium executable, or ``None``."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    images: list[tuple[str, int]]  # (src, naturalWidth)
    errors: list[str]  # console errors, uncaught exceptions, failed loads
    remote_requests: list[str]  # requests to anything but file: and data: URLs
    title: str = ""
    text: str = ""
    screenshot: Path | None = None
    events: list[dict] = field(default_factory=list, repr=False)


class _Pipe:
    def __init__(self, exe: str, profile: str):
        to_r, self._w = os.pipe()
        self._r, from_w = os.pipe()

        def fds():  # Chromium reads commands on fd 3 and writes replies on fd 4
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)

        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4),  # kept open in the child: fds() puts the pipes there
            preexec_fn=fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:  # fmt: skip
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read(deadline))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


_IMAGES_JS = (
    "JSON.stringify(Array.from(document.images).map(i => [i.getAttribute('src'), "
    "i.complete ? i.naturalWidth : -1]))"
)


def open_page(path: Path, screenshot: Path | None = None, exe: str | None = None) -> PageResult:
    """Load ``path`` in headless Chromium with requests outside ``file:``/``data:`` blocked,
    scroll through it (so lazy images load), and collect images, errors and a screenshot."""
    exe = exe or chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        pipe = _Pipe(exe, profile)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.call(f"{domain}.enable", session=sid)
            pipe.call(
                "Network.setBlockedURLs", {"urls": ["http://*", "https://*", "ws://*"]},
                session=sid,
            )  # fmt: skip
            pipe.call("Page.navigate", {"url": Path(path).absolute().as_uri()}, session=sid)
            pipe.wait_for("Page.loadEventFired")
            pipe.call(
                "Runtime.evaluate",
                {"expression": "window.scrollTo(0, document.body.scrollHeight)"},
                session=sid,
            )
            images = json.loads(
                pipe.call(
                    "Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True},
                    session=sid,
                )["result"]["value"]
            )  # fmt: skip
            info = pipe.call(
                "Runtime.evaluate",
                {"expression": "JSON.stringify([document.title, document.body.innerText])",
                 "returnByValue": True},
                session=sid,
            )  # fmt: skip
            title, text = json.loads(info["result"]["value"])
            shot = None
            if screenshot is not None:
                data = pipe.call(
                    "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                    session=sid,
                )["data"]  # fmt: skip
                shot = Path(screenshot)
                shot.write_bytes(base64.b64decode(data))
        finally:
            pipe.close()
    errors, remote = [], []
    for e in pipe.events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(
                " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(params["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file:", "data:")):
                remote.append(url)
    return PageResult([tuple(i) for i in images], errors, remote, title, text, shot, pipe.events)
