"""Helpers of the downstream tests: a stand-in HTTP server for Slack, PagerDuty, Alertmanager and
webhooks (a real aiohttp server on a free 127.0.0.1 port), Redis clean-up, polling."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Received:
    path: str
    body: Any
    headers: dict[str, str]
    failed: bool


def _same_request(path: str, body: Any) -> bytes:
    return path.encode() + b"\x00" + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


class StandIn:
    """Records every POST; answers ``fail_status`` to the first ``fail_first`` copies of each distinct request."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503,
                 identity: Callable[[str, Any], bytes] = _same_request) -> None:
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.identity = identity
        self.received: list[Received] = []
        self._seen: Counter[bytes] = Counter()
        self._lock = threading.Lock()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        ident = self.identity(request.path, body)
        with self._lock:
            self._seen[ident] += 1
            failed = self._seen[ident] <= self.fail_first
            self.received.append(Received(request.path, body, dict(request.headers), failed))
        if failed:
            return web.Response(status=self.fail_status, text="stand-in failing on purpose")
        if "pagerduty" in request.path:
            return web.json_response({"status": "success", "message": "Event processed",
                                      "dedup_key": body.get("dedup_key")}, status=202)
        if "slack" in request.path:
            return web.Response(text="ok")
        return web.Response(status=200)

    def start(self) -> "StandIn":
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application()
            app.router.add_route("POST", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        threading.Thread(target=run, daemon=True, name="standin").start()
        assert ready.wait(10), "stand-in server did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def delivered(self, path: str | None = None) -> list[Any]:
        """Bodies answered with success, in order."""
        with self._lock:
            return [r.body for r in self.received if not r.failed and (path is None or r.path == path)]

    def all(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if path is None or r.path == path]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.3, what: str = "condition") -> Any:
    """Poll ``check`` until it returns a truthy value; return it, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def delete_prefix(prefix: str, url: str = "redis://127.0.0.1:6379/0") -> int:
    """Delete every Redis key under ``prefix:``."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        return client.delete(*keys) if keys else 0
    finally:
        client.close()
