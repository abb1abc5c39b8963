"""Exactly-once processing on a real broker (GRADEFLOW_PROCESSING_GUARANTEE=exactly_once).

A long stream (copies of the fault history under other customer names) is graded from a backlog
while the worker is SIGKILLed at random points of it (three seeds) and a second worker joins (a
rebalance). Read with ``isolation_level=read_committed``, ``grade-changes`` holds every change of
the offline run exactly once: none missing, none twice. The same run with at_least_once shows
copies after the kills, so the check tells the two modes apart.

A worker paused (SIGSTOP) until a second worker has taken its partitions over, then resumed
(SIGCONT), commits nothing more: it finds itself fenced and stops, or revoked.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
import pytest
from kafka import KafkaConsumer

from rules.engine import compile_ruleset
from rules.ruleset import load
from streams.settings import load_settings
from streams.tools.audit import Audit, read_cluster
from streams.tools.local import WorkerProcess, drop_run, free_port, kafka_options, produce, unique_env
from streams.topics import create_topics
from tests.faults.faulthelp import Offline, final_grades, history, summary

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.broker, pytest.mark.timeout(300)]

COPIES = 3
MALFORMED_EVERY = 101  # a record that is not JSON: a dead letter that no state remembers
T = TypeVar("T")


def long_history() -> list[tuple[bytes, bytes]]:
    """COPIES copies of the fault history, each under its own customer names and event ids, with a
    malformed record every MALFORMED_EVERY records.

    A malformed record's dead letter is not remembered in any state: at least once, it is sent again
    whenever its offset was not committed before a crash (docs/guarantees.md, "What is not
    guaranteed"), which makes the copies that mode allows likely at every kill."""
    out: list[tuple[bytes, bytes]] = []
    for k in range(COPIES):
        for key, value in history(seed=5 + k):
            out.append((key.replace(b"cust-", f"c{k}-".encode()),
                        value.replace(b'"cust-', f'"c{k}-'.encode()).replace(b'"event_id":"e',
                                                                             f'"event_id":"k{k}e'.encode())))
            if len(out) % MALFORMED_EVERY == 0:
                out.append((out[-1][0], b"{not json"))
    return out


@pytest.fixture(scope="module")
def records() -> list[tuple[bytes, bytes]]:
    return long_history()


@pytest.fixture(scope="module")
def offline(records: list[tuple[bytes, bytes]]) -> Offline:
    return Offline(list[tuple[bytes | None, bytes | None]](records))


class Changes:
    """A consumer of ``grade-changes`` (or ``topic``) from the beginning, read committed or not, kept
    open so that each :meth:`read` only fetches what is new."""

    def __init__(self, bootstrap: str, env: dict[str, str], committed: bool, topic: str | None = None) -> None:
        self.consumer = KafkaConsumer(topic or env["GRADEFLOW_TOPIC_GRADE_CHANGES"], **kafka_options(bootstrap, env),
                                      auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
                                      isolation_level="read_committed" if committed else "read_uncommitted",
                                      receive_message_max_bytes=64 * 1024 * 1024, fetch_max_bytes=16 * 1024 * 1024)
        self.docs: list[dict[str, Any]] = []

    def read(self, idle_s: float = 0.3, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """What the topic holds so far (until ``idle_s`` without a new record)."""
        started = last = time.monotonic()
        while time.monotonic() - last < idle_s and time.monotonic() - started < timeout_s:
            batch = self.consumer.poll(timeout_ms=100)
            if batch:
                last = time.monotonic()
                for part in batch.values():
                    self.docs.extend(orjson.loads(r.value) for r in part)
        return self.docs

    def close(self) -> None:
        self.consumer.close()


class Outcome:
    """What a run published: per customer the changes (first copy of each id), and the copies."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.changes: dict[str, list[tuple]] = {}
        seen: dict[str, int] = {}
        for doc in docs:
            eid = doc["event_id"]
            seen[eid] = seen.get(eid, 0) + 1
            if seen[eid] == 1:
                self.changes.setdefault(doc["customer_id"], []).append(summary(doc))
        self.copies = sum(n - 1 for n in seen.values())
        self.total = len(docs)
        self.final = final_grades(self.changes)


class Run:
    def __init__(self, bootstrap: str, tag: str, guarantee: str, **extra: str) -> None:
        self.bootstrap = bootstrap
        self.env = unique_env(f"eos-{tag}", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_PARTITIONS="4",
                              GRADEFLOW_KAFKA_SESSION_TIMEOUT_S="6", GRADEFLOW_KAFKA_HEARTBEAT_INTERVAL_S="1",
                              GRADEFLOW_BATCH_SIZE="20", GRADEFLOW_DOWNSTREAM="false",
                              GRADEFLOW_PROCESSING_GUARANTEE=guarantee, **extra)
        settings = load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in self.env.items()})
        create_topics(settings)
        self.workers: dict[str, WorkerProcess] = {}
        self.committed = Changes(bootstrap, self.env, committed=True)
        self.uncommitted = Changes(bootstrap, self.env, committed=False)
        self.dead = Changes(bootstrap, self.env, committed=True, topic=self.env["GRADEFLOW_TOPIC_DEAD_LETTERS"])

    def dead_letters(self) -> tuple[int, int]:
        """The dead letters a read_committed reader has seen: how many distinct source records,
        and how many copies beyond one each."""
        seen: dict[tuple[int, int], int] = {}
        for doc in self.dead.read():
            where = (doc["source_partition"], doc["source_offset"])
            seen[where] = seen.get(where, 0) + 1
        return len(seen), sum(n - 1 for n in seen.values())

    def start(self, name: str) -> WorkerProcess:
        env = {**self.env, "GRADEFLOW_DATA_DIR": f"{self.env['GRADEFLOW_DATA_DIR']}-{name}",
               "GRADEFLOW_WEB_PORT": str(free_port())}
        worker = self.workers[name] = WorkerProcess(env, name=name)
        return worker.start(ready_timeout=120)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{w.tail(25)}" for n, w in self.workers.items())

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.committed.close()
        self.uncommitted.close()
        self.dead.close()
        drop_run(self.bootstrap, self.env)


def wait_until(check: Callable[[], T | None], timeout_s: float, what: Callable[[], str]) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, what()
        time.sleep(0.05)


def graded_up_to(run: Run, expected: int, fraction: float) -> Callable[[], bool]:
    """A condition: the workers have sent (committed or not) ``fraction`` of the expected changes."""
    return lambda: len(run.uncommitted.read(idle_s=0.05)) >= fraction * expected


def finish(run: Run, offline: Offline, timeout_s: float = 150.0) -> Outcome:
    """The read_committed outcome once it holds every expected change (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = Outcome(run.committed.read())
        if got.changes == offline.changes or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def kill_run(bootstrap: str, records: list[tuple[bytes, bytes]], offline: Offline, guarantee: str,
             seed: int, **extra: str) -> tuple[Run, Outcome]:
    """The backlog graded by w1, SIGKILLed twice at random points of it and restarted, w2 joining
    after the first kill; returns the run and what a read_committed consumer saw at the end."""
    rng = random.Random(seed)
    mode = "eos" if guarantee == "exactly_once" else "alo"
    run = Run(bootstrap, f"{mode}-{seed}", guarantee, **extra)
    expected = sum(len(seq) for seq in offline.changes.values())
    try:
        produce(bootstrap, run.env["GRADEFLOW_TOPIC_TRANSACTIONS"], records)
        w1 = run.start("w1")
        points = sorted(rng.uniform(0.1, 0.6) for _ in range(2))
        for kill, point in enumerate(points):
            stuck = f"w1 did not reach {point:.0%} of the changes"
            wait_until(graded_up_to(run, expected, point), 120, lambda: f"{stuck}\n{run.logs()}")  # noqa: B023
            w1.kill()
            w1 = run.start("w1")
            if kill == 0:
                run.start("w2")  # a rebalance mid-stream (ready: it has joined the group)
        if extra.get("GRADEFLOW_CLOCK", "off") != "off":
            return run, Outcome(run.committed.read())  # the caller waits on the audit
        return run, finish(run, offline)
    except BaseException:
        run.stop()
        raise


def differences(offline: Offline, got: Outcome) -> str:
    differ = sorted(c for c in set(offline.changes) | set(got.changes) if got.changes.get(c) != offline.changes.get(c))
    examples = "\n".join(f"  {c}: offline {offline.changes.get(c)}\n     online  {got.changes.get(c)}"
                         for c in differ[:2])
    return f"{len(differ)} customers differ\n{examples}" if differ else ""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_and_rebalanced_every_change_exactly_once(bootstrap, records, offline, seed) -> None:
    run, got = kill_run(bootstrap, records, offline, "exactly_once", seed)
    try:
        diff = differences(offline, got)
        assert not diff, f"{diff}\n{run.logs()}"
        assert got.copies == 0, f"{got.copies} changes read twice by a read_committed consumer"
        assert got.total == sum(len(seq) for seq in offline.changes.values())
        assert got.final == offline.final
        assert run.dead_letters() == (len(offline.dead), 0), "dead letters missing or read twice"
        # The uncommitted view holds the aborted transactions' outputs too: the kills did cut
        # transactions that a plain consumer would have seen.
        assert len(run.uncommitted.read()) >= got.total
    finally:
        run.stop()


def test_event_clock_killed_every_change_exactly_once(bootstrap, records, offline) -> None:
    # The event clock adds what a plain run does not write: each partition's stream-time marker on
    # the changelog with the batch's states, and the timer's wakes, each a transaction of its own.
    # `gradeflow audit` recomputes the whole topic offline with the same clock.
    run, _ = kill_run(bootstrap, records, offline, "exactly_once", 4, GRADEFLOW_CLOCK="event",
                      GRADEFLOW_CLOCK_TICK_S="0.2")
    try:
        settings = load_settings(**{k[len("GRADEFLOW_"):].lower(): v for k, v in run.env.items()})
        audit = Audit(compile_ruleset(load(settings.ruleset)), clock="event")
        deadline = time.monotonic() + 150
        while True:
            inputs, changes, alerts = read_cluster(settings)
            report = audit.check(inputs, changes, alerts)
            if (report.ok and report.expected_changes == report.changes) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert report.ok, f"{report.render()}\n{run.logs()}"
        assert report.copies == 0, report.render()
        assert report.changes == report.expected_changes, report.render()
        clocked = [doc for doc in run.committed.read() if doc["cause"]["kind"] == "clock"]
        assert clocked, "the clock changed no grade: the test does not exercise its wakes"
    finally:
        run.stop()


def test_at_least_once_repeats_changes_after_kills(bootstrap, records, offline) -> None:
    # The same run without transactions: nothing is lost, but the kills leave copies (same ids, or
    # the same source record's dead letter), which is what the exactly-once test above would catch.
    run, got = kill_run(bootstrap, records, offline, "at_least_once", 1)
    try:
        assert not differences(offline, got), run.logs()
        dead, dead_copies = run.dead_letters()
        assert dead == len(offline.dead)
        assert got.copies + dead_copies > 0, "no copy after two kills at least once"
        print(f"at least once: {got.copies} changes and {dead_copies} dead letters read twice")
    finally:
        run.stop()


def test_paused_worker_is_fenced_and_commits_nothing(bootstrap, records, offline) -> None:
    run = Run(bootstrap, "zombie", "exactly_once")
    expected = sum(len(seq) for seq in offline.changes.values())
    try:
        produce(bootstrap, run.env["GRADEFLOW_TOPIC_TRANSACTIONS"], records)
        w1 = run.start("w1")
        wait_until(graded_up_to(run, expected, 0.2), 120, lambda: f"w1 graded nothing\n{run.logs()}")
        proc = w1.proc
        assert proc is not None
        # Paused mid-backlog, with small batches: a transaction is open or about to commit.
        os.kill(proc.pid, signal.SIGSTOP)
        paused_log = len(w1.tail(1_000_000))
        try:
            w2 = run.start("w2")  # joins; the group waits out w1's session, then w2 owns every partition
            wait_until(lambda: _owns_all(w2.tail(10_000)), 90,
                       lambda: f"w2 did not take every partition\n{run.logs()}")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        got = finish(run, offline)
        diff = differences(offline, got)
        assert not diff, f"{diff}\n{run.logs()}"
        assert got.copies == 0, f"{got.copies} changes read twice"
        # Resumed, w1 tries to finish what it held: the broker refuses its producers (fenced), and
        # it stops. Caught with no transaction open, it is told it left the group and is revoked,
        # committing nothing more either way.
        after = lambda: w1.tail(1_000_000)[paused_log:]  # noqa: E731
        wait_until(lambda: proc.poll() is not None or "revoked, their transactions ended" in after(), 90,
                   lambda: f"w1 neither stopped nor was revoked\n{w1.tail()}")
        if proc.poll() is not None or "is fenced" in after():
            assert "is fenced" in after() and "this worker stops without committing" in after(), after()
            proc.wait(30)
            assert proc.returncode != 0
        # Nothing w1 sent after the takeover reached a read_committed reader: still exactly once.
        again = Outcome(run.committed.read(idle_s=2.0))
        assert again.copies == 0 and again.changes == offline.changes
        assert w2.proc is not None and w2.proc.poll() is None, w2.tail()
    finally:
        run.stop()


def _owns_all(log: str) -> bool:
    """Whether the worker's last assignment (Faust's log table) holds all four input partitions."""
    found = re.findall(r"input partitions \[([0-9, ]*)\] assigned", log)
    return bool(found) and found[-1].replace(" ", "") == "0,1,2,3"
