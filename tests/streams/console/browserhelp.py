"""Headless Chromium (Debian's package) driven over the Chrome DevTools protocol, for the console's tests.

No browser is downloaded: the ``chromium`` on the PATH is used, installed with apt-get when it is
missing and the tests run as root (what a fresh machine running ``make test`` needs).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson

SCREENSHOTS = Path(__file__).resolve().parents[3] / ".local" / "screenshots"


def chromium_path() -> str:
    """The chromium binary; installs Debian's package when it is missing and we are root."""
    found = shutil.which("chromium")
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
        found = shutil.which("chromium")
    if found is None:
        raise RuntimeError("chromium is not installed: apt-get install -y chromium")
    return found


class Browser:
    """One headless Chromium with one page; every call waits for its answer (a deadline on each)."""

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="gradeflow-chromium-")
        # --no-sandbox: Chromium refuses to run as root with its sandbox (tests may run as root in CI).
        self.proc = subprocess.Popen(
            [chromium_path(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in orjson.loads(resp.read()) if t["type"] == "page"]
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count(1)
        self.session: aiohttp.ClientSession | None = None
        self.ws: Any = None
        self.loop.run_until_complete(self._connect(pages[0]["webSocketDebuggerUrl"]))
        self.send("Page.enable")
        self.send("Runtime.enable")

    async def _connect(self, url: str) -> None:
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        ident = next(self.ids)
        await self.ws.send_str(orjson.dumps({"id": ident, "method": method, "params": params}).decode())
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), timeout=30)
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise RuntimeError(f"DevTools connection closed: {msg.type}")
            doc = orjson.loads(msg.data)
            if doc.get("id") == ident:
                if "error" in doc:
                    raise RuntimeError(f"{method}: {doc['error']}")
                return dict(doc.get("result", {}))

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self._call(method, params))

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.js(expression)
            except RuntimeError as exc:  # the page is navigating: its context is gone for a moment
                last = exc
            else:
                if last:
                    return last
            time.sleep(0.1)
        try:
            text = self.js("location.href + '\\n' + document.body.innerText")
        except RuntimeError as exc:
            text = repr(exc)
        raise TimeoutError(f"{what or expression} not true after {timeout}s (last: {last!r}); the page:\n{text}")

    def viewport(self, width: int, height: int, mobile: bool = False) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=2 if mobile else 1, mobile=mobile)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.loop.run_until_complete(self.ws.close())
        if getattr(self, "session", None) is not None:
            self.loop.run_until_complete(self.session.close())  # type: ignore[union-attr]
        if getattr(self, "loop", None) is not None:
            self.loop.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)
