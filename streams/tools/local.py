"""Run workers as child processes and read topics, for the demo, the benchmark and tests.

Workers run as real ``gradeflow worker`` processes (not in the caller's event
loop) so that what is exercised is what users deploy, and so that a test can
kill one with SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

ROOT = Path(__file__).resolve().parents[2]


def unique_env(prefix: str = "gf", **extra: str) -> dict[str, str]:
    """GRADEFLOW_ variables naming topics and an app id no other run uses."""
    tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
    env = {
        "GRADEFLOW_APP_ID": tag,
        "GRADEFLOW_TOPIC_TRANSACTIONS": f"{tag}-transactions",
        "GRADEFLOW_TOPIC_INTERACTIONS": f"{tag}-interactions",
        "GRADEFLOW_TOPIC_GRADE_CHANGES": f"{tag}-grade-changes",
        "GRADEFLOW_TOPIC_ALERTS": f"{tag}-grade-alerts",
        "GRADEFLOW_TOPIC_DEAD_LETTERS": f"{tag}-dead-letters",
        "GRADEFLOW_TOPIC_ALERT_DEAD_LETTERS": f"{tag}-alert-dead-letters",
        "GRADEFLOW_TOPIC_CUSTOMER_ERASURES": f"{tag}-customer-erasures",
        "GRADEFLOW_TOPIC_ERASURE_MARKERS": f"{tag}-erasure-markers",
        "GRADEFLOW_TOPIC_ERASURE_RECEIPTS": f"{tag}-erasure-receipts",
        "GRADEFLOW_TOPIC_SHADOW_DIFFS": f"{tag}-grade-shadow-diffs",
        "GRADEFLOW_TOPIC_CUSTOMER_MERGES": f"{tag}-customer-merges",
        "GRADEFLOW_DATA_DIR": str(ROOT / ".local" / "workers" / tag),
        # Scripted histories lie in the past: under the wall clock every customer would be
        # re-graded by time at once. Tests of the clock ask for one (GRADEFLOW_CLOCK=event).
        "GRADEFLOW_CLOCK": "off",
    }
    env.update(extra)
    return env


_RUN_TAG = re.compile(r"[a-z0-9-]+-[0-9a-f]{8}")


def drop_run(bootstrap: str, env: Mapping[str, str]) -> list[str]:
    """Delete the topics and the data directory of a run made with :func:`unique_env`; return the topics.

    Every topic of the run starts with its app id: the ones ``unique_env`` names and Faust's own
    (changelogs, the assignor's). A broker that keeps every run's topics slows down: after a day of
    benchmark and test runs (~1,300 partitions, 6.5 GB) the benchmark's latency run went from a p99
    of ~0.1 s to ~2 s on a 2-core VM, so runs that measure clean up after themselves.
    """
    import shutil

    from kafka.admin import KafkaAdminClient

    tag = env["GRADEFLOW_APP_ID"]
    if not _RUN_TAG.fullmatch(tag):
        raise ValueError(f"{tag!r} is not an app id made by unique_env: refusing to delete its topics")
    admin = KafkaAdminClient(**kafka_options(bootstrap, env))
    try:
        names = sorted(t for t in admin.list_topics() if t.startswith(f"{tag}-"))
        if names:
            admin.delete_topics(names)
    finally:
        admin.close()
    data_dir = env.get("GRADEFLOW_DATA_DIR")
    if data_dir:
        shutil.rmtree(data_dir, ignore_errors=True)
    return names


@dataclass
class WorkerProcess:
    """A ``gradeflow worker`` child process with its own log file."""

    env: dict[str, str]
    name: str = "worker"
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, ready_timeout: float = 60.0, wait_ready: bool = True) -> "WorkerProcess":
        """Start and wait until Faust reports the worker ready (unless ``wait_ready`` is false)."""
        logs = ROOT / ".local" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{self.env.get('GRADEFLOW_APP_ID', 'gradeflow')}-{self.name}.log"
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        # Several workers (tests, helpers, a developer's own) share this host.
        env.setdefault("GRADEFLOW_WEB_PORT", str(free_port()))
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.tools.cli", "worker", *self.args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        out.close()
        if not wait_ready:
            return self
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            if b"gradeflow: worker ready" in self.log_path.read_bytes():
                return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {ready_timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        """The last lines of the worker's log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Stop the worker (SIGTERM, then SIGKILL after ``timeout``); return its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        self.stop(signal.SIGKILL)


def kafka_options(bootstrap: str, env: Mapping[str, str] | None = None) -> dict[str, object]:
    """kafka-python options for ``bootstrap`` with the connection settings (TLS, SASL) of the
    environment, overridden by the ``GRADEFLOW_*`` entries of ``env`` (e.g. a worker's env)."""
    from streams.kafka_config import kafka_python_options
    from streams.settings import load_settings

    overrides: dict[str, object] = {k[len("GRADEFLOW_"):].lower(): v for k, v in (env or {}).items()
                                    if k.startswith("GRADEFLOW_")}
    overrides["kafka_bootstrap"] = bootstrap
    return kafka_python_options(load_settings(**overrides))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def producer(bootstrap: str, env: Mapping[str, str] | None = None) -> KafkaProducer:
    """A producer with the durability gradeflow's inputs deserve."""
    return KafkaProducer(**kafka_options(bootstrap, env), acks="all", linger_ms=5,
                         batch_size=256 * 1024, max_in_flight_requests_per_connection=1)


def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes | None]],
            env: Mapping[str, str] | None = None) -> int:
    """Send (key, value) records in order and flush; return how many."""
    p = producer(bootstrap, env)
    n = 0
    for key, value in records:
        p.send(topic, key=key, value=value)
        n += 1
    p.flush()
    p.close()
    return n


def consume(bootstrap: str, topics: list[str], until: int | None = None, idle_s: float = 10.0,
            timeout_s: float = 120.0, env: Mapping[str, str] | None = None,
            ) -> Iterator[tuple[str, bytes | None, bytes]]:
    """Yield (topic, key, value) from the beginning of ``topics``.

    Stops after ``until`` records, after ``idle_s`` without a record, or at ``timeout_s``.
    """
    # kafka-python caps a network frame at 1 MiB by default while one fetch can
    # return far more: raise the cap to the fetch size.
    consumer = KafkaConsumer(*topics, **kafka_options(bootstrap, env), auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, receive_message_max_bytes=64 * 1024 * 1024)
    seen = 0
    started = last = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now - started >= timeout_s or now - last >= idle_s:
                return
            batch = consumer.poll(timeout_ms=200)
            if not batch:
                continue
            last = time.monotonic()
            for records in batch.values():
                for r in records:
                    yield r.topic, r.key, r.value
                    seen += 1
                    if until is not None and seen >= until:
                        return
    finally:
        consumer.close()


def group_assignment(bootstrap: str, group: str, env: Mapping[str, str] | None = None,
                     ) -> tuple[str, dict[str, dict[str, set[int]]]]:
    """The consumer group's state and, per member client id, the partitions the coordinator gave it.

    Faust assigns a worker the changelog partitions of its active partitions *and* of its
    standby partitions, so a member whose changelog partitions exceed its input partitions
    holds standby copies. Give each worker its own ``GRADEFLOW_KAFKA_CLIENT_ID`` to tell them apart.
    """
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(**kafka_options(bootstrap, env))
    try:
        [info] = admin.describe_consumer_groups([group])
    finally:
        admin.close()
    members: dict[str, dict[str, set[int]]] = {}
    for member in info.members:
        topics: dict[str, set[int]] = {}
        if member.member_assignment is not None:
            for topic, partitions in member.member_assignment.assignment:
                topics.setdefault(topic, set()).update(partitions)
        members[member.client_id] = topics
    return info.state, members


def wait_group(bootstrap: str, group: str, members: int, topic: str, timeout_s: float = 60.0,
               env: Mapping[str, str] | None = None) -> dict[str, dict[str, set[int]]]:
    """Wait until ``group`` is stable with ``members`` members, each owning partitions of ``topic``."""
    deadline = time.monotonic() + timeout_s
    state, assignment = "", dict[str, dict[str, set[int]]]()
    while time.monotonic() < deadline:
        state, assignment = group_assignment(bootstrap, group, env)
        if state == "Stable" and len(assignment) == members and all(a.get(topic) for a in assignment.values()):
            return assignment
        time.sleep(0.3)
    raise TimeoutError(f"group {group} not stable with {members} members owning {topic}: {state} {assignment}")


def faust_log_tables(text: str, title: str) -> list[tuple[float, dict[tuple[str, int], int]]]:
    """Every table titled ``title`` that Faust logged (e.g. ``Reading Starts At - Active``), in order.

    Each is (wall time of its log line, {(topic, partition): value}). Faust's recovery states where
    it starts reading each changelog partition, and its highwater, only in these log tables.
    """
    from datetime import datetime

    found: list[tuple[float, dict[tuple[str, int], int]]] = []
    lines = text.splitlines()
    stamp = 0.0
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("[") and len(line) > 24 and line[24] == "]":
            try:
                stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
            except ValueError:
                pass
        if line.startswith(f"+{title}-"):
            rows: dict[tuple[str, int], int] = {}
            topic = ""
            i += 3  # the title border, the header row, the rule below it
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                topic = topic if cells[0] == "〃" else cells[0]  # Faust writes a ditto mark for a repeat
                rows[(topic, int(cells[1]))] = int(cells[2])
                i += 1
            found.append((stamp, rows))
        i += 1
    return found
