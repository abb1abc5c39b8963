"""deploy/local/up and down keep track of what they start: `down` stops it whatever ran before on the
same port, and a failed `up` stops what it had started.

The scripts run from a copy of deploy/local in a temporary directory, which is then their project
root: its own `.local/` (pid files, data, logs) and its own ports, found free for this run. The
servers of the checkout (the shared broker and Redis) are never selected, stopped or wiped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streams.tools.local import ROOT
from tests.deploy.localcluster import free_base_port

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(600)]

LIGHT_JVMS = {"KAFKA_HEAP_OPTS": "-Xms64m -Xmx384m", "CLUSTER_HEAP_OPTS": "-Xms64m -Xmx384m",
              "CONTROLLER_HEAP_OPTS": "-Xms32m -Xmx192m"}


@dataclass
class Scripts:
    root: Path  # the copy's project root: the scripts find `.local/` here
    kafka_port: int
    redis_port: int

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **LIGHT_JVMS, "GRADEFLOW_KAFKA_BOOTSTRAP": f"127.0.0.1:{self.kafka_port}",
                "GRADEFLOW_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0", **extra}

    def run(self, name: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.root / "deploy" / "local" / name), *args], env=self.env(**extra),
                              capture_output=True, text=True, timeout=240)

    def alive(self) -> list[tuple[int, str]]:
        """Every live process that belongs to the copy: started from its files or working in its
        directory (Redis rewrites its command line, not its working directory)."""
        mine = str(self.root)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                cwd = os.readlink(entry / "cwd")
                zombie = "\nState:\tZ" in (entry / "status").read_text()
            except OSError:
                continue  # gone meanwhile, or not ours to read
            if not zombie and (mine in cmdline or cwd.startswith(mine)):
                found.append((int(entry.name), cmdline.strip()[:120]))
        return found

    def listening(self, port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scripts]:
    root = tmp_path_factory.mktemp("gradeflow-checkout")
    shutil.copytree(ROOT / "deploy" / "local", root / "deploy" / "local")
    libs = ROOT / ".local" / "kafka" / "libs"
    if any(libs.glob(".installed-kafka-*")):  # the checkout's jars, read only; else `up` fetches its own
        (root / ".local" / "kafka").mkdir(parents=True)
        (root / ".local" / "kafka" / "libs").symlink_to(libs)
    # A broker port P with P+1 (its controller, or a second broker) .. P+3 free, and a Redis port.
    base = free_base_port(5)
    copy = Scripts(root, base, base + 4)
    try:
        yield copy
    finally:
        copy.run("down", "--all")
        for pid, _ in copy.alive():  # only processes of this copy, which this module started
            os.kill(pid, 9)


def test_a_failed_cluster_up_stops_the_controller_and_brokers_it_started(scripts: Scripts) -> None:
    # The second broker's port is taken by someone else: `up` starts the controller and the first
    # broker, then finds the port taken and fails.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", scripts.kafka_port + 1))
        squatter.listen()
        done = scripts.run("up", "--brokers", "2")
    assert done.returncode != 0
    assert f"port {scripts.kafka_port + 1} is already in use" in done.stderr, done.stderr
    assert "stopping what it started (controller-1 kafka-1)" in done.stdout, done.stdout
    assert scripts.alive() == []
    run_dir = scripts.root / ".local" / "clusters" / str(scripts.kafka_port) / "run"
    assert sorted(p.name for p in run_dir.glob("*.pid")) == []
    assert scripts.run("ps").stdout == ""


def test_a_failed_single_node_up_stops_the_kafka_and_redis_it_started(scripts: Scripts) -> None:
    # Redis answers at once; a broker cannot within one second: `up` times out waiting for it.
    done = scripts.run("up", GRADEFLOW_UP_TIMEOUT="1")
    assert done.returncode != 0
    assert "kafka did not answer within 1s" in done.stderr, done.stdout + done.stderr
    assert "stopping what it started (kafka redis)" in done.stdout, done.stdout
    assert scripts.alive() == []
    assert not scripts.listening(scripts.redis_port)
    assert sorted(p.name for p in (scripts.root / ".local" / "run").glob("*.pid")) == []


def test_down_stops_the_single_node_set_after_a_cluster_used_the_same_port(scripts: Scripts) -> None:
    # A cluster on P, stopped: its directory (and stale bookkeeping) stays behind.
    assert scripts.run("up", "--brokers", "2").returncode == 0
    assert scripts.run("down").returncode == 0
    assert scripts.alive() == []
    # Then the single-node set on the same port P, with its Redis.
    up = scripts.run("up")
    assert up.returncode == 0, up.stdout + up.stderr
    listed = {line.split()[0]: line.split()[2] for line in scripts.run("ps").stdout.splitlines()}
    assert listed == {"kafka-1": f"127.0.0.1:{scripts.kafka_port}", "redis": f"127.0.0.1:{scripts.redis_port}"}

    down = scripts.run("down")

    assert down.returncode == 0 and "stopped 2 server(s)" in down.stdout, down.stdout + down.stderr
    assert scripts.alive() == []
    assert not scripts.listening(scripts.kafka_port) and not scripts.listening(scripts.redis_port)
    assert scripts.run("ps").stdout == ""
