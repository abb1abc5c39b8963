"""Helpers of the on-call tests: a real HTTP server on 127.0.0.1 that answers what a test scripts
(status, headers, body per request), in the test's own event loop; and a real Alertmanager."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import ClientSession, web

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"


@dataclass
class Hit:
    path: str
    at: float  # time.monotonic() when the request arrived
    raw: bytes
    headers: dict[str, str]

    @property
    def body(self) -> Any:
        return orjson.loads(self.raw)


class Scripted:
    """POST /<anything>: answers the next scripted :class:`Answer` of that path, then 200 ``ok``."""

    def __init__(self) -> None:
        self.script: dict[str, list[Answer]] = {}
        self.hits: list[Hit] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    def answer(self, path: str, *answers: Answer) -> None:
        self.script.setdefault(path, []).extend(answers)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits.append(Hit(request.path, time.monotonic(), await request.read(), dict(request.headers)))
        queue = self.script.get(request.path) or []
        a = queue.pop(0) if queue else Answer()
        return web.Response(status=a.status, headers=a.headers, text=a.body)

    async def __aenter__(self) -> "Scripted":
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


# ----------------------------------------------------------------------------- Alertmanager

AM_CONFIG = """\
route:
  receiver: blackhole
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: blackhole
"""


def alertmanager_binary() -> str:
    """The Alertmanager binary, built once into the user's cache by deploy/local/alertmanager."""
    out = subprocess.run([str(ROOT / "deploy" / "local" / "alertmanager")], capture_output=True, text=True,
                         timeout=1800, check=False)
    assert out.returncode == 0, f"deploy/local/alertmanager failed:\n{out.stderr[-3000:]}"
    return out.stdout.strip().splitlines()[-1]


class Alertmanager:
    """One Alertmanager on 127.0.0.1:<port>, no cluster, its storage in a temp dir; restartable."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="gradeflow-am-"))
        (self.dir / "am.yml").write_text(AM_CONFIG)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.dir / "am.log", "ab")  # noqa: SIM115 - kept open for the process's life
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'am.yml'}", f"--storage.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"],
            stdout=log, stderr=log, env={**os.environ})
        log.close()

    async def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc is not None and self.proc.poll() is None, self.log()
                try:
                    async with s.get(self.url + "/-/ready") as r:
                        if r.status == 200:
                            return
                except OSError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"Alertmanager not ready in {timeout}s:\n{self.log()}")

    async def alerts(self) -> list[dict[str, Any]]:
        async with ClientSession() as s, s.get(self.url + "/api/v2/alerts") as r:
            assert r.status == 200, await r.text()
            return list(await r.json())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def log(self) -> str:
        path = self.dir / "am.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
