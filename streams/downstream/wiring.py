"""Everything downstream of grading, attached to the app by :func:`attach_downstream`.

It consumes the *output* topics, never the inputs, so that nothing here can
slow or break the grading hot path:

- ``redis-writer`` (grade-changes → Redis current grades, streams/downstream/redis_grades.py, and each
  customer's bounded grade history, streams/downstream/history.py)
- ``alert-dispatcher`` (grade-alerts + grade-changes → on-call sinks, streams/downstream/alerts/)
- ``alert-retry`` (the retry topic → the same sinks, when due); what a sink refuses for good
  goes to the alert dead-letter topic instead, never retried
- the HTTP API and /metrics (streams/downstream/web.py, streams/downstream/metrics.py)

All three agents share the app's consumer group, so each partition of those
topics is handled by one worker at a time; acks (and so commits) happen after
the work is done (at least once), and the work is idempotent (Redis versions,
alert ``sent`` marks).

Redis down degrades this side only: grading goes on, while the redis-writer and
the alert dispatcher wait for Redis (never skipping a record), the gauge
``gradeflow_redis_up`` says 0, and one log line marks each change of state.
A stopping worker, or one giving partitions up in a rebalance, does not wait
for Redis: Faust waits for every record an agent holds to be acknowledged
before it lets the worker stop or the rebalance finish, so work that cannot
finish (Redis or the broker down, a slow sink) is given up after
``RELEASE_GRACE_S`` *without* acknowledging its records (:func:`release`).
Their offsets are not committed, and the worker that gets the partition next
reads them again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import orjson
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from rules.engine import CompiledRuleset, compile_ruleset
from rules.ruleset import load
from streams.downstream import web
from streams.downstream.alerts.delivery import Dispatcher
from streams.downstream.alerts.policy import check_settings
from streams.faustext.faust_pages import close_builtin_pages
from streams.downstream.metrics import Metrics, observe_batch
from streams.downstream.history import AsyncHistory, Bounds
from streams.downstream.redis_grades import RESULT_NAMES, AsyncGrades, parse_change
from streams.settings import Settings, alert_retries_topic, redact, redis_prefix
from streams.topics import ALERT_RETRIES_RETENTION_S

log = logging.getLogger("gradeflow.downstream")

__all__ = ["attach_downstream", "observe_batch", "Downstream"]

RETRY_RETENTION_S = ALERT_RETRIES_RETENTION_S  # the layout `gradeflow topics` declares
_TRANSIENT = (RedisError, KafkaError, OSError, asyncio.TimeoutError)

# How long work in flight may still finish once the worker stops or gives its partitions up; then it is
# given up unacknowledged. Well inside a 20 s stop, long enough for a delivery that is merely slow.
RELEASE_GRACE_S = 5.0
# How often a wait (a retry's back-off, work in flight) looks whether the worker is stopping.
_POLL_S = 0.25
# Seconds between pings of Redis that keep gradeflow_redis_up true while no grade changes come.
REDIS_PROBE_S = 5.0


class Released(Exception):
    """The worker is stopping or giving partitions up: the work in hand is given up, unacknowledged."""


def release(events: Iterable[Any]) -> None:
    """Give Faust events up without acknowledging them.

    Faust waits (``Consumer.wait_empty``) until every message an agent took is
    acknowledged before a worker stops or a rebalance completes, and commits an
    offset only once every message before it has been acknowledged
    (``Consumer.ack`` records it, the commit takes the acknowledged offsets up
    to the first gap). A message marked done without ``Consumer.ack`` leaves
    that wait (which drops messages marked done from its set) but never enters
    the commit: its offset and every later one of its partition stay
    uncommitted, so the record is read again after the restart or the
    rebalance (whose seek goes back to the committed offset). Faust's own
    ``Message.ack`` is a no-op for it afterwards, so the ``take_events`` buffer
    that acknowledges a batch when the agent moves on cannot commit it either.
    """
    for event in events:
        event.message.acked = True


class Availability:
    """Up or down of one dependency, logged once per change of state (never once per failure)."""

    def __init__(self, name: str, consequence: str, gauge: Any = None, settings: Settings | None = None) -> None:
        self.name = name
        self.consequence = consequence
        self.gauge = gauge
        self.settings = settings
        self.up: bool | None = None  # unknown until the first operation

    def ok(self) -> None:
        if self.up is False:
            log.warning("gradeflow: %s is reachable again; %s resume", self.name, self.consequence)
        if self.up is not True:
            self.up = True
            if self.gauge is not None:
                self.gauge.set(1)

    def failed(self, exc: BaseException) -> None:
        if self.up is not False:
            detail = f"{type(exc).__name__}: {exc}"
            if self.settings is not None:
                detail = redact(detail, self.settings)  # a client's message is not ours to trust
            log.warning("gradeflow: %s is unreachable (%s); %s wait for it and retry (grading goes on)",
                        self.name, detail, self.consequence)
            self.up = False
            if self.gauge is not None:
                self.gauge.set(0)


class Downstream:
    """Shared clients of the downstream agents of one app."""

    def __init__(self, app: Any, settings: Settings, ruleset: CompiledRuleset) -> None:
        self.app = app
        self.settings = settings
        self.ruleset = ruleset
        self.prefix = redis_prefix(settings)
        self.metrics = Metrics(app)
        self._redis: Any = None
        self._grades: AsyncGrades | None = None
        self._history: AsyncHistory | None = None
        self._dispatcher: Dispatcher | None = None
        self.retry_topic: Any = None
        self.alert_dead_letter_topic: Any = None
        self.redis_state = Availability("Redis", "current grades and alert de-duplication",
                                        self.metrics.redis_up, settings)
        self.broker_state = Availability("Kafka (alert retry topic)", "alert retries", None, settings)

    def redis(self) -> Any:
        if self._redis is None:
            import redis.asyncio as aioredis

            # Short timeouts: a Redis that does not answer is down for the gauge, and a stopping worker
            # gives up on it (RELEASE_GRACE_S) sooner than a long timeout would return.
            self._redis = aioredis.Redis.from_url(self.settings.redis_url.get_secret_value(), socket_timeout=5,
                                                  socket_connect_timeout=2, health_check_interval=30)
        return self._redis

    def grades(self) -> AsyncGrades:
        if self._grades is None:
            self._grades = AsyncGrades(self.redis(), self.prefix)
        return self._grades

    def history(self) -> AsyncHistory:
        if self._history is None:
            self._history = AsyncHistory(self.redis(), self.prefix, Bounds.of(self.settings))
        return self._history

    async def _apply_changes(self, items: list[tuple[dict[str, Any], int]]) -> list[int]:
        # Both idempotent: after a failure between the two, the retry finds the grades already applied.
        results = await self.grades().apply(items)
        await self.history().record(items)
        return results

    def switch(self, ruleset: CompiledRuleset) -> None:
        """A promotion made ``ruleset`` the active one (streams/rules_control.py): alerts and
        recoveries are read by its ladders from now on."""
        self.ruleset = ruleset
        if self._dispatcher is not None:
            self._dispatcher.switch(ruleset)

    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self.settings, self.ruleset, self.redis(), self.prefix,
                                          self.schedule_retry, self.metrics, dead_letter=self.dead_letter_alert)
        return self._dispatcher

    async def close(self) -> None:
        """Close the HTTP session and the Redis connections (at worker shutdown)."""
        if self._dispatcher is not None:
            await self._dispatcher.close()
        if self._redis is not None:
            await self._redis.aclose()

    async def schedule_retry(self, doc: dict[str, Any]) -> None:
        """Put a delivery on the retry topic and wait until the broker has it."""
        key = str(doc["item"].get("customer_id", "")).encode()
        fut = await self.retry_topic.send(key=key, value=orjson.dumps(doc))
        await fut

    async def dead_letter_alert(self, doc: dict[str, Any]) -> None:
        """Put a delivery a sink refused for good on the alert dead-letter topic; wait until the broker has it."""
        key = str(doc["alert"].get("customer_id", "")).encode()
        fut = await self.alert_dead_letter_topic.send(key=key, value=orjson.dumps(doc))
        await fut

    async def batches(self, stream: Any, size: int) -> AsyncIterator[list[Any]]:
        """The stream's events, up to ``size`` at a time; a batch taken after a stop or revocation
        began is given up unacknowledged instead (read again, by whoever owns it)."""
        async for events in stream.take_events(size, within=0.2):
            if self.releasing():
                release(events)
                continue
            erasure = getattr(self.app, "gradeflow_erasure", None)
            if erasure is not None:
                # Records of an erased customer read after the erasure must not write them back.
                events = erasure.keep(events)
            if events:
                yield events

    def releasing(self) -> bool:
        """Whether the worker is stopping or in a rebalance (Faust suspends its flow control for one)."""
        app = self.app
        return bool(app.should_stop) or not app.flow_control.is_active()

    async def guard(self, work: Awaitable[Any]) -> Any:
        """Await ``work``; once :meth:`releasing` has held for ``RELEASE_GRACE_S``, cancel it and raise Released."""
        task = asyncio.ensure_future(work)
        since: float | None = None
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_POLL_S)
                if done:
                    return task.result()
                if self.releasing():
                    since = since if since is not None else time.monotonic()
                    if time.monotonic() - since >= RELEASE_GRACE_S:
                        raise Released()
        finally:
            if not task.done():
                task.cancel()

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds`` before a retry; raise Released as soon as the worker stops or rebalances."""
        deadline = time.monotonic() + seconds
        while True:
            if self.releasing():
                raise Released()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, _POLL_S))

    async def write_grades(self, items: list[tuple[dict[str, Any], int]]) -> None:
        """Apply grade changes to Redis (current grades, history); while Redis fails, wait and try again (never skip).

        Raises Released when the worker stops or rebalances before Redis took them.
        """
        delay = 0.2
        while True:
            try:
                results = await self.guard(self._apply_changes(items))
                break
            except (Released, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - redis/connection errors: back off, retry
                self.metrics.redis_errors.inc()
                self.redis_state.failed(exc)
                await self.pause(delay)
                delay = min(delay * 2, 10.0)
        self.redis_state.ok()
        for r in results:
            self.metrics.redis_writes.labels(RESULT_NAMES.get(r, str(r))).inc()

    async def persist(self, what: str, work: Callable[[], Awaitable[Any]]) -> None:
        """Run ``work`` until it does not raise (Redis down, broker busy): an event is never skipped.

        Raises Released when the worker stops or rebalances before the work is done.
        """
        delay = 0.2
        failing: Availability | None = None
        while True:
            try:
                await self.guard(work())
                if failing is not None:
                    failing.ok()
                return
            except (Released, asyncio.CancelledError):
                raise
            except _TRANSIENT as exc:
                failing = self.redis_state if isinstance(exc, RedisError) else self.broker_state
                failing.failed(exc)
                await self.pause(delay)
                delay = min(delay * 2, 10.0)
            except Exception:  # noqa: BLE001 - a bad document: say so, never kill the agent
                log.exception("gradeflow: %s failed on a malformed document; skipped", what)
                return

    async def probe_redis(self) -> None:
        """Ping Redis once and record the answer (the gauge and the state-change log line)."""
        try:
            await asyncio.wait_for(self.redis().ping(), timeout=3.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: Redis is not usable
            self.redis_state.failed(exc)
        else:
            self.redis_state.ok()


def _ruleset(settings: Settings) -> CompiledRuleset:
    return compile_ruleset(load(settings.ruleset))


def attach_downstream(app: Any, settings: Settings, table: Any) -> Downstream:
    """Register the downstream agents, the HTTP API and the metrics on ``app``."""
    active = getattr(app, "gradeflow_rules", None)  # streams/rules_control.py: what rules-control made active
    ruleset = active.active if active is not None else _ruleset(settings)
    check_settings(settings, ruleset)  # a bad alert setting stops the worker at start, not each alert
    ds = Downstream(app, settings, ruleset)
    app.gradeflow_metrics = ds.metrics
    app.gradeflow_downstream = ds
    close_builtin_pages(app)  # before web.register: its first page builds Faust's web server
    web.register(app, settings, table, ruleset, ds)
    if active is not None:
        active.downstream = ds

    @app.on_before_shutdown.connect
    async def _close_clients(app: Any, **kwargs: Any) -> None:
        await ds.close()

    if not settings.downstream:
        return ds

    names = settings.topics
    changes = app.topic(names.grade_changes, key_type=bytes, value_type=bytes)
    alerts_and_changes = app.topic(names.alerts, names.grade_changes, key_type=bytes, value_type=bytes)
    ds.retry_topic = app.topic(alert_retries_topic(settings), key_type=bytes, value_type=bytes, internal=True,
                               partitions=settings.partitions, replicas=settings.replication_factor,
                               retention=RETRY_RETENTION_S)
    ds.alert_dead_letter_topic = app.topic(names.alert_dead_letters, key_type=bytes, value_type=bytes)
    alerts_topic = names.alerts

    if settings.alert_alertmanager_url:
        @app.timer(settings.alert_alertmanager_resend_s, name="alertmanager-resend")
        async def alertmanager_resend() -> None:
            # Every worker wakes; a Redis lease lets one of them re-send per interval.
            try:
                await ds.dispatcher().resend_firing()
            except _TRANSIENT as exc:
                log.warning("gradeflow: re-sending firing alerts to Alertmanager failed (%s: %s)",
                            type(exc).__name__, exc)
    @app.timer(interval=REDIS_PROBE_S)
    async def redis_probe() -> None:
        await ds.probe_redis()

    @app.agent(changes, name="redis-writer")
    async def redis_writer(stream: Any) -> None:
        async for events in ds.batches(stream, settings.redis_batch_size):
            items = []
            for event in events:
                doc = parse_change(event.message.value)
                if doc is None:
                    continue
                items.append((doc, event.message.offset))
                ds.metrics.changes.labels(doc["ladder"], str(doc.get("direction"))).inc()
            if items:
                try:
                    await ds.write_grades(items)
                except Released:
                    release(events)

    @app.agent(alerts_and_changes, name="alert-dispatcher")
    async def alert_dispatcher(stream: Any) -> None:
        async for events in ds.batches(stream, 200):
            # Sequential per customer (their order matters), concurrent across customers.
            by_customer: dict[bytes | None, list[tuple[bool, float | None, dict[str, Any]]]] = {}
            for event in events:
                m = event.message
                try:
                    doc = orjson.loads(m.value)
                except orjson.JSONDecodeError:
                    log.warning("gradeflow: skipping a record that is not JSON on %s", m.topic)
                    continue
                by_customer.setdefault(m.key, []).append((m.topic == alerts_topic, m.timestamp, doc))
            outcomes = await asyncio.gather(*(_dispatch_all(ds, docs) for docs in by_customer.values()),
                                            return_exceptions=True)
            if any(isinstance(o, Released) for o in outcomes):
                release(events)  # all of them: a customer's alerts are idempotent, their order matters
            for outcome in outcomes:
                if isinstance(outcome, BaseException) and not isinstance(outcome, Released):
                    raise outcome

    @app.agent(ds.retry_topic, name="alert-retry")
    async def alert_retry(stream: Any) -> None:
        async for value in stream:
            if ds.releasing():
                release([stream.current_event])
                continue
            try:
                doc = orjson.loads(value)
                wait = float(doc["due"]) - time.time()
                doc["kind"], doc["sink"], doc["item"]  # noqa: B018 - present, or the record is not ours
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("gradeflow: skipping a record on the alert retry topic that is not a retry")
                continue
            erasure = getattr(app, "gradeflow_erasure", None)
            if erasure is not None and isinstance(doc["item"], dict) and erasure.erased(doc["item"]):
                continue  # a retry of an erased customer's alert: delivering it would write them back to Redis
            try:
                if wait > 0:
                    await ds.pause(min(wait, 1.0))
                    if float(doc["due"]) - time.time() > 0:
                        # Not due yet: back to the end of the queue, so later records are not held up.
                        await ds.persist("requeue of an alert retry", functools.partial(ds.schedule_retry, doc))
                        continue
                await ds.persist(f"retry of a {doc['kind']} to {doc['sink']}",
                                 functools.partial(ds.dispatcher().on_retry, doc))
            except Released:
                release([stream.current_event])

    return ds


async def _dispatch_all(ds: Downstream, docs: list[tuple[bool, float | None, dict[str, Any]]]) -> None:
    """Alerts and grade changes of one customer, in order (with their record timestamps)."""
    dispatcher = ds.dispatcher()
    for is_alert, produced_at, doc in docs:
        if is_alert:
            await ds.persist("alert dispatch", functools.partial(dispatcher.on_alert, doc, produced_at))
        else:
            await ds.persist("recovery dispatch", functools.partial(dispatcher.on_change, doc))
