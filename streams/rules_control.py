"""The active ruleset of every worker of an app, from the rules-control topic.

``gradeflow rules promote`` and ``gradeflow rules rollback`` write one record (key ``active``,
:class:`schemas.events.RulesControl`) on ``<app id>-rules-control`` (one partition, compacted):
the ruleset's whole YAML document, its ``id@version``, the one active before (with its document,
for a rollback), who and when, and a ``control_version`` one above the last. Every worker

- reads the topic to its end at start, before it grades anything (:func:`read_control`): the
  record's ruleset wins over ``GRADEFLOW_RULESET``, and the worker says so on stderr when they
  differ (:func:`choose_start`), so a restart keeps a promoted version;
- follows it while it runs (:meth:`ActiveRules.follow`) and switches on a record whose
  ``control_version`` is above its own (:meth:`ActiveRules.apply`). The switch holds the worker's
  writer lock (streams/clock.py): every batch, clock wake and re-grade step is graded entirely by
  one version, and once a worker has graded anything by the new version it never grades by the old
  one again. Then the re-grade sweep (streams/rules_start.py) runs over all its partitions.

Each worker publishes its re-grade progress on the same topic (key ``progress/<worker>``,
:class:`schemas.events.RulesProgress`), which ``gradeflow rules promote --wait`` follows for every
worker at once; the same numbers are in ``GET /rules`` and the metrics.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson
from pydantic import ValidationError

from rules.engine import CompiledRuleset, compile_ruleset
from rules.ruleset import parse
from schemas.errors import GradeflowError, RulesetError
from schemas.events import RulesControl, RulesetRef, RulesProgress
from streams.settings import rules_control_topic
from streams.shadow import switch_active

log = logging.getLogger("gradeflow.rules")

ACTIVE = b"active"
PROGRESS = b"progress/"
_NAMESPACE = uuid.UUID("0b5e7a52-7f4c-5c8e-9d3a-6a1f2e4c8b90")
PROGRESS_EVERY_S = 0.5  # least time between two progress records of a worker (but the first and last)


class ControlError(GradeflowError):
    """A control record that cannot be applied, or a promotion or rollback that cannot be made."""


def promotion_id(group_id: str, control_version: int, ruleset_key: str) -> str:
    """The deterministic id of a control record: the cause ``event_id`` of the changes it makes."""
    return str(uuid.uuid5(_NAMESPACE, f"{group_id}\x1f{control_version}\x1f{ruleset_key}"))


def decode_control(key: bytes | None, value: bytes | None) -> RulesControl | None:
    """The control record of a record of the topic; None for another key (progress) or a tombstone."""
    if key != ACTIVE or value is None:
        return None
    return RulesControl.model_validate_json(value)


def compile_record(record: RulesControl) -> CompiledRuleset:
    """The ruleset of ``record``, compiled from its document; refused if the document is not the
    ruleset the record names (states are marked by ``id@version``: two documents under one key
    would leave customers graded by the other one unnoticed)."""
    source = f"rules-control v{record.control_version}"
    ruleset = compile_ruleset(parse(record.document, source))
    named = f"{record.ruleset.id}@{record.ruleset.version}"
    if ruleset.key != named:
        raise ControlError(f"{source}: the document is ruleset {ruleset.key}, the record names {named}")
    return ruleset


def ref(ruleset: CompiledRuleset) -> RulesetRef:
    return RulesetRef(id=ruleset.id, version=ruleset.version)


def key_of(r: RulesetRef) -> str:
    return f"{r.id}@{r.version}"


# --------------------------------------------------------------------------- reading the topic


def _consumer(settings: Any, timeout_s: float) -> Any:
    from kafka import KafkaConsumer

    from streams.kafka_config import kafka_python_options

    return KafkaConsumer(**kafka_python_options(settings), group_id=None, enable_auto_commit=False,
                         request_timeout_ms=int(max(timeout_s, 11) * 1000) + 1000)


def topic_partitions(settings: Any, topic: str) -> int | None:
    """How many partitions ``topic`` has, None when it does not exist. Asked of the admin API: a
    consumer's metadata request would have a broker that auto-creates topics create it."""
    from streams.topics import admin_client

    admin = admin_client(settings)
    try:
        if topic not in set(admin.list_topics()):
            return None
        [found] = admin.describe_topics([topic])
        return len(found["partitions"])
    finally:
        admin.close()


def read_topic(settings: Any, timeout_s: float = 15.0, check: bool = True
               ) -> tuple[list[tuple[bytes | None, bytes | None]], int]:
    """Every record of the rules-control topic, in order, and the offset after the last;
    :class:`ControlError` when the topic does not exist (a producer would have the broker create
    it with its defaults, not compacted). ``check`` False: the caller knows it exists."""
    from kafka import TopicPartition

    topic = rules_control_topic(settings)
    if check and topic_partitions(settings, topic) is None:
        raise ControlError(f"{topic}: missing (create it with `gradeflow topics create`)")
    consumer = _consumer(settings, timeout_s)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        out: list[tuple[bytes | None, bytes | None]] = []
        deadline = time.monotonic() + timeout_s
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise ControlError(f"{topic}: not read to its end (offset {end}) within {timeout_s:g} s")
            for records in consumer.poll(timeout_ms=500).values():
                out += [(r.key, r.value) for r in records if r.offset < end]
        return out, end
    finally:
        consumer.close()


def latest_control(records: Sequence[tuple[bytes | None, bytes | None]]) -> RulesControl | None:
    """The record in force after ``records``: in offset order, each one whose control_version is
    above the one in force replaces it (a second writer of the same version loses)."""
    current: RulesControl | None = None
    for key, value in records:
        try:
            record = decode_control(key, value)
        except ValidationError:
            log.error("gradeflow: a malformed rules-control record was ignored")
            continue
        if record is not None and (current is None or record.control_version > current.control_version):
            current = record
    return current


def read_control(settings: Any, timeout_s: float = 15.0) -> tuple[RulesControl | None, int]:
    """The control record in force (None: nobody ever promoted) and the offset to follow from."""
    records, end = read_topic(settings, timeout_s)
    return latest_control(records), end


@dataclass
class Start:
    """What a worker starts with: the ruleset, the control record that made it active (if any) and
    the offset of the rules-control topic to follow from."""

    ruleset: CompiledRuleset
    record: RulesControl | None
    offset: int
    note: str | None = None  # said loudly at start: the control record overrides GRADEFLOW_RULESET


def choose_start(local: CompiledRuleset, record: RulesControl | None, offset: int) -> Start:
    """The control record's ruleset wins over the local one (``GRADEFLOW_RULESET``): a restart, or a
    worker added later, grades by what was promoted, whatever its own files say."""
    if record is None:
        return Start(local, None, offset)
    ruleset = compile_record(record)
    note = None
    if ruleset.key != local.key:
        note = (f"gradeflow worker: WARNING: ruleset {ruleset.key} is active by rules-control "
                f"v{record.control_version} ({record.action} by {record.requested_by} at "
                f"{record.requested_at.isoformat()}); GRADEFLOW_RULESET names {local.key}, which is NOT used "
                f"(promote it to run it)")
    return Start(ruleset, record, offset, note)


# --------------------------------------------------------------------------- the worker's side


class ActiveRules:
    """The worker's active ruleset: switches its grading components on new control records and
    publishes its re-grade progress."""

    def __init__(self, app: Any, settings: Any, start: Start, writer: asyncio.Lock) -> None:
        self.app, self.settings, self.writer = app, settings, writer
        self.active = start.ruleset
        self.record = start.record
        self.offset = start.offset
        self.control_version = start.record.control_version if start.record is not None else 0
        self.promotion_id = start.record.promotion_id if start.record is not None else None
        self.previous: str | None = key_of(start.record.previous) if start.record and start.record.previous else None
        self.switches = 0
        self.refused = 0  # control records that could not be applied (a bad document)
        self.switched_at: float | None = None  # wall time of the last switch
        self.worker = f"{socket.gethostname()}:{getattr(settings, 'web_port', 0)}"
        self.grader: Any = None
        self.clock: Any = None
        self.regrade: Any = None
        self.population: Any = None
        self.downstream: Any = None
        self.merging: Any = None  # streams/merging.py, with GRADEFLOW_CUSTOMER_MERGES
        self._reported = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def topic(self) -> str:
        return rules_control_topic(self.settings)

    # -- switching

    async def apply(self, record: RulesControl) -> bool:
        """Switch to ``record``'s ruleset if its control_version is above ours; True if it did."""
        if record.control_version <= self.control_version:
            return False
        try:
            ruleset = compile_record(record)
        except (RulesetError, ControlError) as exc:
            self.refused += 1
            problems = "; ".join(getattr(exc, "problems", [])) or str(exc)
            log.error("gradeflow: rules-control v%d refused, still grading by %s: %s",
                      record.control_version, self.active.key, problems)
            return False
        if ruleset.quantiles and self.population is None:
            self.refused += 1
            log.error("gradeflow: rules-control v%d refused, still grading by %s: ruleset %s grades against the "
                      "population, which this worker does not follow (it started on a ruleset without relative "
                      "grades): restart the workers to run it", record.control_version, self.active.key, ruleset.key)
            return False
        async with self.writer:
            # Under the writer lock: the batch, wake or re-grade step before this one was graded
            # entirely by the old version, every one after by the new one.
            before = self.active.key
            self.active, self.record = ruleset, record
            self.control_version, self.promotion_id = record.control_version, record.promotion_id
            self.previous = before
            if self.grader is not None:
                self.grader.ruleset, self.grader.promotion_id = ruleset, record.promotion_id
            if self.clock is not None:
                self.clock.rs = ruleset
            if self.population is not None:
                self.population.switch(ruleset)
            if self.regrade is not None:
                self.regrade.switch(ruleset, record.promotion_id)
            if self.downstream is not None:
                self.downstream.switch(ruleset)
            if self.merging is not None:
                self.merging.rs = ruleset
            switch_active(self.app, ruleset, self.grader, self.clock, self.regrade)  # shadow rulesets, if any
            self.switches += 1
            self.switched_at = time.time()
        log.warning("gradeflow: ruleset %s → %s by rules-control v%d (%s by %s); re-grading every customer",
                    before, ruleset.key, record.control_version, record.action, record.requested_by)
        # In the background: the follower must read a rollback that comes during a long re-grade.
        task = asyncio.ensure_future(self._after_switch())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _after_switch(self) -> None:
        if self.regrade is not None:
            await self.regrade.run()
        if self.clock is not None and getattr(self.clock, "mode", "off") != "off":
            # The clock's due instants were computed by the old version: compute them again from
            # the re-graded states (until then a wake leaves customers of another version alone).
            await self.clock.rebuild()

    async def follow(self) -> None:
        """Follow the topic from where the start read stopped, forever, applying new records."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from streams.kafka_config import kafka_python_options

        consumer = AIOKafkaConsumer(group_id=None, enable_auto_commit=False, **kafka_python_options(self.settings))
        await consumer.start()
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            consumer.seek(tp, self.offset)
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for r in records:
                        self.offset = r.offset + 1
                        try:
                            record = decode_control(r.key, r.value)
                        except ValidationError:
                            log.error("gradeflow: a malformed rules-control record (offset %d) was ignored", r.offset)
                            continue
                        if record is not None:
                            await self.apply(record)
        finally:
            await consumer.stop()

    # -- progress

    def progress(self) -> RulesProgress:
        p = self.regrade.progress.as_dict() if self.regrade is not None else {
            "partitions": [], "partitions_done": [], "customers_total": 0, "customers_done": 0, "regraded": 0,
            "eta_s": None, "complete": True}
        p.pop("ruleset", None)
        return RulesProgress(worker=self.worker, control_version=self.control_version, ruleset=ref(self.active),
                             updated_at=datetime.now(timezone.utc), **p)

    async def report(self) -> None:
        """Publish this worker's progress on the topic (at most every PROGRESS_EVERY_S, but the
        first and last step of a sweep)."""
        if self.regrade is None:
            return
        sweep = self.regrade.progress
        now = time.monotonic()
        edge = sweep.complete or sweep.done == 0
        if not edge and now - self._reported < PROGRESS_EVERY_S:
            return
        self._reported = now
        producer = self.app.producer._ensure_producer()
        value = self.progress().model_dump_json().encode()
        await producer.send_and_wait(self.topic, key=PROGRESS + self.worker.encode(), value=value, partition=0)

    def status(self) -> dict[str, Any]:
        """What ``GET /rules`` answers."""
        record = self.record
        progress = self.progress().model_dump(mode="json")
        return {
            "active": ref(self.active).model_dump(),
            "control_version": self.control_version,
            "promotion_id": self.promotion_id,
            "previous": self.previous,
            "action": record.action if record is not None else None,
            "requested_by": record.requested_by if record is not None else None,
            "requested_at": record.requested_at.isoformat() if record is not None else None,
            "switches": self.switches,
            "refused": self.refused,
            "regrade": progress,
            # True once every customer of this worker's partitions is graded by the active ruleset.
            "regrade_complete": progress["complete"],
        }


def attach_rules_control(app: Any, settings: Any, start: Start, writer: asyncio.Lock, grader: Any, clock: Any,
                         regrade: Any, population: Any) -> ActiveRules:
    """Follow the rules-control topic in ``app`` and switch ``grader``, ``clock``, ``regrade`` and
    ``population`` on new records; return the object (``app.gradeflow_rules``)."""
    rules = ActiveRules(app, settings, start, writer)
    rules.grader, rules.clock, rules.regrade, rules.population = grader, clock, regrade, population
    grader.promotion_id = rules.promotion_id
    regrade.promotion_id = rules.promotion_id
    regrade.on_progress = rules.report
    app.gradeflow_rules = rules

    @app.task
    async def _rules_control_follow() -> None:
        # A broker hiccup must not stop grading: the worker goes on with the ruleset it has.
        while True:
            try:
                await rules.follow()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("gradeflow: following the rules-control topic failed; retrying in 5 s")
                await asyncio.sleep(5)

    return rules


# --------------------------------------------------------------------------- the command's side


def requester() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def build_record(settings: Any, current: RulesControl | None, local: CompiledRuleset, local_text: str,
                 candidate: CompiledRuleset, candidate_text: str, action: str) -> RulesControl:
    """The next control record: ``candidate`` active, the one in force (``current``, else the local
    ``GRADEFLOW_RULESET``) as previous."""
    if current is not None:
        previous, previous_text = current.ruleset, current.document
    else:
        previous, previous_text = ref(local), local_text
    version = (current.control_version if current is not None else 0) + 1
    return RulesControl(control_version=version, action=action,  # type: ignore[arg-type]
                        promotion_id=promotion_id(settings.group_id, version, candidate.key),
                        ruleset=ref(candidate), document=candidate_text, previous=previous,
                        previous_document=previous_text, requested_by=requester(),
                        requested_at=datetime.now(timezone.utc))


def write_record(settings: Any, record: RulesControl, timeout_s: float = 15.0) -> None:
    """Write ``record`` on the topic and wait until the broker has it (all in-sync replicas)."""
    from kafka import KafkaProducer

    from streams.kafka_config import kafka_python_options

    producer = KafkaProducer(**kafka_python_options(settings), acks="all")
    try:
        producer.send(rules_control_topic(settings), key=ACTIVE, value=orjson.dumps(record.model_dump(mode="json")),
                      partition=0).get(timeout=timeout_s)
    finally:
        producer.close()


def coverage(records: Sequence[tuple[bytes | None, bytes | None]], control_version: int, ruleset_key: str
             ) -> tuple[set[int], int, int, list[RulesProgress]]:
    """From the topic's records: the input partitions some worker reported done for
    ``control_version`` and ``ruleset_key``, customers done and total (latest report of each
    worker), and those reports."""
    latest: dict[bytes, RulesProgress] = {}
    for key, value in records:
        if key is None or not key.startswith(PROGRESS) or value is None:
            continue
        try:
            report = RulesProgress.model_validate_json(value)
        except ValidationError:
            continue
        if report.control_version == control_version and key_of(report.ruleset) == ruleset_key:
            latest[key] = report
    done: set[int] = set()
    for report in latest.values():
        done.update(report.partitions_done)
    total = sum(r.customers_total for r in latest.values())
    examined = sum(r.customers_total if r.complete else r.customers_done for r in latest.values())
    return done, examined, total, list(latest.values())
