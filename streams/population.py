"""Population sketches on Kafka: each worker publishes its partitions', every worker merges all.

Relative grades ("top 5% by 365-day spend", "above the median") compare a
customer with everyone (rules/population.py, pure). This module moves the
sketches: periodically, the worker sketches the current value of every
customer of each input partition it owns, one sketch per relatively-compared
metric, and publishes it on a compacted topic keyed ``<ruleset id>@<version>/<partition>``
(the latest sketch of each partition survives compaction, whichever worker
owned it). Every worker follows that topic from the beginning with its own
group-less consumer, merges the latest sketch of every partition and keeps the
thresholds the ruleset needs in :attr:`Population.thresholds`, a dict the agent
passes to ``process_batch(..., population=...)``.

Wiring (streams/app.py, in create_app, after the table is made)::

    population = attach_population(app, settings, ruleset, table)
    ...
    result = process_batch(records, ruleset, store, utcnow(),
                           population=population.thresholds if population else None)

``attach_population`` returns None (and adds nothing) when the ruleset has no
relative comparison. Settings it reads if present (defaults otherwise):
``topic_population`` (default ``<group id>-population``) and
``population_interval_s`` (default 30). The topic is created at start if
missing (1 partition, ``cleanup.policy=compact``, the settings' replication
factor).

Cost: each publication decodes every state of the worker's table once (a few
microseconds per customer), in chunks that yield to the event loop; thresholds
change only when sketches arrive, and a customer's grade follows them at the
customer's next event. Values are taken as of the latest event time the worker
has seen (event time, like every grade).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable
from datetime import datetime
from itertools import islice
from typing import Any, Protocol

from rules import population as pop
from rules.engine import CompiledRuleset
from rules.state import CustomerState

log = logging.getLogger("gradeflow.population")
CHUNK = 5000


class StateItems(Protocol):
    """Where the sketches read states: the worker's :class:`streams.faustext.tables.FaustStateStore`, a dict in tests."""

    def partition_items(self, partitions: Collection[int]) -> Iterable[tuple[bytes, int, bytes]]: ...


class Population:
    """Current thresholds of the ruleset's relative comparisons, kept up to date from the topic."""

    def __init__(self, settings: Any, ruleset: CompiledRuleset, store: StateItems | None, app: Any = None) -> None:
        self.settings = settings
        self.rs = ruleset
        self.store = store
        self.app = app
        self.topic = getattr(settings, "topic_population", None) or f"{settings.group_id}-population"
        self.interval_s = float(getattr(settings, "population_interval_s", 30.0))
        self.prefix = f"{ruleset.key}/"
        self.thresholds: dict[tuple[str, float], float] = {}
        self.latest: dict[str, dict[str, pop.Sketch]] = {}
        self.published = 0
        self.received = 0

    def switch(self, ruleset: CompiledRuleset) -> None:
        """A promotion made ``ruleset`` the active one (streams/rules_control.py): follow its sketches
        from now on. The thresholds known stay until the new version's arrive: a quantile of a
        metric over the same customers does not depend on which version asks for it."""
        self.rs = ruleset
        self.prefix = f"{ruleset.key}/"
        self.latest = {}

    # ------------------------------------------------------------ pure-ish parts, tested without a broker

    def apply(self, key: bytes | None, value: bytes | None) -> bool:
        """Take one record of the population topic; True when the thresholds changed."""
        if key is None:
            return False
        name = key.decode("utf-8", "replace")
        if not name.startswith(self.prefix):
            return False  # another ruleset or version
        if value is None:
            self.latest.pop(name, None)
        else:
            try:
                self.latest[name] = pop.decode(value)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("gradeflow: ignoring an unreadable population sketch %s: %s", name, exc)
                return False
        self.received += 1
        fresh = pop.thresholds(self.rs, pop.merge(self.latest.values()))
        if fresh == self.thresholds:
            return False
        self.thresholds.clear()
        self.thresholds.update(fresh)
        return True

    async def sketch_partitions(self, active: set[int]) -> dict[int, dict[str, pop.Sketch]]:
        """One sketch set per active partition, from the states held for it (yielding to the loop
        between chunks). A state counts for the partition it lives on: producers may partition
        as they like."""
        states: dict[int, list[CustomerState]] = {p: [] for p in active}
        latest_ts: float | None = None
        assert self.store is not None
        held = iter(self.store.partition_items(active))
        while chunk := list(islice(held, CHUNK)):
            for _key, p, raw in chunk:
                if p not in states:
                    continue
                state = CustomerState.from_bytes(raw)
                if state.merged_into is not None:
                    continue  # an id merged into another (docs/customers.md): not a customer of its own
                states[p].append(state)
                if state.last_event_ts is not None and (latest_ts is None or state.last_event_ts > latest_ts):
                    latest_ts = state.last_event_ts
            await asyncio.sleep(0)
        if latest_ts is None:
            return {}
        as_of = datetime.fromtimestamp(latest_ts, self.rs.tz)
        out = {}
        for p, group in states.items():
            if group:
                out[p] = pop.build(self.rs, group, as_of)
                await asyncio.sleep(0)
        return out

    # ------------------------------------------------------------ Kafka

    def active_partitions(self) -> set[int]:
        inputs = self.settings.topics.transactions
        return {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == inputs}

    async def publish(self) -> int:
        """Publish the sketches of this worker's active partitions; return how many."""
        active = self.active_partitions()
        if not active:
            return 0
        sketches = await self.sketch_partitions(active)
        producer = self.app.producer
        for p, parts in sorted(sketches.items()):
            await producer.send(self.topic, f"{self.prefix}{p}".encode(), pop.encode(parts), None, None, None)
        if sketches:
            await producer.flush()
        self.published += len(sketches)
        return len(sketches)

    def ensure_topic(self) -> None:
        """Create the compacted population topic if it is missing (blocking: run in a thread)."""
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        from streams.topics import admin_client

        admin = admin_client(self.settings)
        try:
            if self.topic not in admin.list_topics():
                try:
                    admin.create_topics([NewTopic(self.topic, 1, self.settings.replication_factor,
                                                  topic_configs={"cleanup.policy": "compact"})])
                except TopicAlreadyExistsError:
                    pass
        finally:
            admin.close()

    async def follow(self) -> None:
        """Read the population topic from the beginning, forever, into :attr:`thresholds`."""
        from aiokafka import AIOKafkaConsumer

        from streams.kafka_config import kafka_python_options

        options = kafka_python_options(self.settings)
        consumer = AIOKafkaConsumer(self.topic, group_id=None, auto_offset_reset="earliest",
                                    enable_auto_commit=False, **options)
        await consumer.start()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        if self.apply(record.key, record.value):
                            log.info("gradeflow: population thresholds %s", self.thresholds)
        finally:
            await consumer.stop()


def attach_population(app: Any, settings: Any, ruleset: CompiledRuleset, store: StateItems) -> Population | None:
    """Publish and follow population sketches for ``ruleset``'s relative grades; None if it has none."""
    if not ruleset.quantiles:
        return None
    population = Population(settings, ruleset, store, app)
    app.gradeflow_population = population

    @app.task
    async def _population_follow() -> None:
        # Never let a broker hiccup here stop the worker: grading goes on with the last thresholds.
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(None, population.ensure_topic)
                await population.follow()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("gradeflow: following the population topic failed; retrying in 5 s")
                await asyncio.sleep(5)

    @app.timer(interval=population.interval_s)
    async def _population_publish() -> None:
        try:
            await population.publish()
        except Exception:  # noqa: BLE001 - a failed publication must never stop grading
            log.exception("gradeflow: publishing population sketches failed; will retry")

    return population
