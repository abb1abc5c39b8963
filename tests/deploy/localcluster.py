"""Extra local Kafka clusters for tests: `deploy/local/up --brokers N [--sasl-ssl]` on their own ports.

A cluster a test starts is stopped, and its directory removed, by that test
(``with LocalCluster(...) as c``); a cluster that was already running (a developer's, on ports
given by the environment) is left running. Without a port from the environment each test run
picks free ports of its own, so that several runs of the suite in one checkout (several
engineers, CI jobs) never share, stop or wipe each other's cluster.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from streams.tools.local import ROOT

UP = ROOT / "deploy" / "local" / "up"
DOWN = ROOT / "deploy" / "local" / "down"
PS = ROOT / "deploy" / "local" / "ps"


def free_base_port(count: int, tries: int = 50) -> int:
    """A port P such that P .. P+count-1 are free on 127.0.0.1 right now."""
    for _ in range(tries):
        base = random.randrange(20000, 45000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports found")


def port_from_env(name: str, servers: int) -> int:
    """The port in ``name`` if set (a cluster one keeps running), else free ports for this run."""
    value = os.environ.get(name)
    return int(value) if value else free_base_port(servers)


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
        ours = {f"127.0.0.1:{p}" for p in range(self.port, self.port + self.brokers + 1)}  # brokers + controller
        servers = {}
        for line in out.splitlines():
            name, pid, addr = line.split()
            if addr in ours:  # `ps` lists the default set when this cluster has no directory yet
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
            shutil.rmtree(ROOT / ".local" / "clusters" / str(self.port), ignore_errors=True)
