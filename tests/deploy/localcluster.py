"""Extra local Kafka clusters for tests: `deploy/local/up --brokers N [--sasl-ssl]` on their own ports.

A cluster a test starts is stopped by that test (``with LocalCluster(...) as c``); a cluster that
was already running (a developer's) is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

from streams.local import ROOT

UP = ROOT / "deploy" / "local" / "up"
DOWN = ROOT / "deploy" / "local" / "down"
PS = ROOT / "deploy" / "local" / "ps"


@dataclass
class LocalCluster:
    port: int
    brokers: int = 1
    sasl_ssl: bool = False
    env: dict[str, str] = field(default_factory=dict)  # GRADEFLOW_* printed by `up`
    started: bool = False

    def _script_env(self) -> dict[str, str]:
        return {**os.environ, "GRADEFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{self.port}"}

    def up(self, timeout: float = 150, fresh: bool = False) -> dict[str, str]:
        """Start (or complete) the cluster; return the GRADEFLOW_* variables `up` prints."""
        args = [str(UP), "--brokers", str(self.brokers)] + (["--sasl-ssl"] if self.sasl_ssl else [])
        args += ["--fresh"] if fresh else []
        proc = subprocess.run(args, env=self._script_env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        env = {}
        for line in proc.stdout.splitlines():
            if line.startswith("GRADEFLOW_") and "=" in line:
                key, _, value = line.partition("=")
                env[key] = value
        self.env = env
        return env

    def ps(self) -> dict[str, tuple[int, str]]:
        """name → (pid, address) of this cluster's live servers."""
        out = subprocess.run([str(PS)], env=self._script_env(), capture_output=True, text=True, check=True).stdout
        servers = {}
        for line in out.splitlines():
            name, pid, addr = line.split()
            servers[name] = (int(pid), addr)
        return servers

    def kill(self, name: str) -> None:
        """SIGKILL one server, as a crash, and wait until it is gone."""
        pid = self.ps()[name][0]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)

    def down(self) -> None:
        subprocess.run([str(DOWN)], env=self._script_env(), capture_output=True, text=True, timeout=120)

    def __enter__(self) -> "LocalCluster":
        self.started = not self.ps()
        # A cluster this test starts starts empty: topics of earlier runs would slow it down.
        self.up(fresh=self.started)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.down()
