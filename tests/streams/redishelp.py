"""A Redis server of a test's own: a real ``redis-server`` on a free 127.0.0.1 port, optionally with a
password, that a test can stop and start again (Redis down, then back)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from streams.tools.local import free_port


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port``, no persistence; ``password`` sets ``requirepass``."""

    def __init__(self, workdir: Path, password: str | None = None, port: int | None = None) -> None:
        self.workdir = workdir
        self.password = password
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def start(self, timeout: float = 15.0) -> "RedisServer":
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server on port {self.port} did not answer in {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
