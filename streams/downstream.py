"""Everything downstream of grading, attached to the app by :func:`attach_downstream`.

It consumes the *output* topics, never the inputs, so that nothing here can
slow or break the grading hot path:

- ``redis-writer`` (grade-changes → Redis current grades, streams/redis_grades.py)
- ``alert-dispatcher`` (grade-alerts + grade-changes → on-call sinks, streams/alerts.py)
- ``alert-retry`` (the retry topic → the same sinks, when due)
- the HTTP API and /metrics (streams/web.py, streams/metrics.py)

All three agents share the app's consumer group, so each partition of those
topics is handled by one worker at a time; acks (and so commits) happen after
the work is done (at least once), and the work is idempotent (Redis versions,
alert ``sent`` marks).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from rules.engine import CompiledRuleset, compile_ruleset
from rules.ruleset import load
from streams import web
from streams.alerts import Dispatcher, check_settings
from streams.faust_pages import close_builtin_pages
from streams.metrics import Metrics, observe_batch
from streams.redis_grades import RESULT_NAMES, AsyncGrades, parse_change
from streams.settings import Settings, alert_retries_topic, redis_prefix
from streams.topics import ALERT_RETRIES_RETENTION_S

log = logging.getLogger("gradeflow.downstream")

__all__ = ["attach_downstream", "observe_batch", "Downstream"]

RETRY_RETENTION_S = ALERT_RETRIES_RETENTION_S  # the layout `gradeflow topics` declares
_TRANSIENT = (RedisError, KafkaError, OSError, asyncio.TimeoutError)


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
        self._dispatcher: Dispatcher | None = None
        self.retry_topic: Any = None

    def redis(self) -> Any:
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(self.settings.redis_url.get_secret_value(), socket_timeout=10,
                                                  socket_connect_timeout=5, health_check_interval=30)
        return self._redis

    def grades(self) -> AsyncGrades:
        if self._grades is None:
            self._grades = AsyncGrades(self.redis(), self.prefix)
        return self._grades

    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(self.settings, self.ruleset, self.redis(), self.prefix,
                                          self.schedule_retry, self.metrics)
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

    async def write_grades(self, items: list[tuple[dict[str, Any], int]]) -> None:
        """Apply grade changes to Redis; while Redis fails, wait and try again (never skip)."""
        delay = 0.2
        while True:
            try:
                results = await self.grades().apply(items)
                break
            except Exception as exc:  # noqa: BLE001 - redis/connection errors: back off, retry
                self.metrics.redis_errors.inc()
                log.warning("gradeflow: redis-writer cannot write to Redis (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        for r in results:
            self.metrics.redis_writes.labels(RESULT_NAMES.get(r, str(r))).inc()

    async def persist(self, what: str, work: Callable[[], Awaitable[Any]]) -> None:
        """Run ``work`` until it does not raise (Redis down, broker busy): an event is never skipped."""
        delay = 0.2
        while True:
            try:
                await work()
                return
            except asyncio.CancelledError:
                raise
            except _TRANSIENT as exc:
                log.warning("gradeflow: %s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            except Exception:  # noqa: BLE001 - a bad document: say so, never kill the agent
                log.exception("gradeflow: %s failed on a malformed document; skipped", what)
                return


class _WebSettings:
    """The settings as streams/web.py reads them: the API token as the plain string it compares.

    Everything else is the settings' own; ``repr`` stays the settings' (token masked).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self._settings, name)

    @property
    def api_token(self) -> str | None:
        token = self._settings.api_token
        return token.get_secret_value() if token is not None else None

    def __repr__(self) -> str:
        return repr(self._settings)


def _ruleset(settings: Settings) -> CompiledRuleset:
    return compile_ruleset(load(settings.ruleset))


def attach_downstream(app: Any, settings: Settings, table: Any) -> Downstream:
    """Register the downstream agents, the HTTP API and the metrics on ``app``."""
    ruleset = _ruleset(settings)
    check_settings(settings, ruleset)  # a bad alert setting stops the worker at start, not each alert
    ds = Downstream(app, settings, ruleset)
    app.gradeflow_metrics = ds.metrics
    app.gradeflow_downstream = ds
    close_builtin_pages(app)  # before web.register: its first page builds Faust's web server
    web.register(app, _WebSettings(settings), table, ruleset, ds)

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
    alerts_topic = names.alerts

    @app.agent(changes, name="redis-writer")
    async def redis_writer(stream: Any) -> None:
        async for events in stream.take_events(settings.redis_batch_size, within=0.2):
            items = []
            for event in events:
                doc = parse_change(event.message.value)
                if doc is None:
                    continue
                items.append((doc, event.message.offset))
                ds.metrics.changes.labels(doc["ladder"], str(doc.get("direction"))).inc()
            if items:
                await ds.write_grades(items)

    @app.agent(alerts_and_changes, name="alert-dispatcher")
    async def alert_dispatcher(stream: Any) -> None:
        async for events in stream.take_events(200, within=0.2):
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
            await asyncio.gather(*(_dispatch_all(ds, docs) for docs in by_customer.values()))

    @app.agent(ds.retry_topic, name="alert-retry")
    async def alert_retry(stream: Any) -> None:
        async for value in stream:
            try:
                doc = orjson.loads(value)
                wait = float(doc["due"]) - time.time()
                doc["kind"], doc["sink"], doc["item"]  # noqa: B018 - present, or the record is not ours
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("gradeflow: skipping a record on the alert retry topic that is not a retry")
                continue
            if wait > 0:
                await asyncio.sleep(min(wait, 1.0))
                if float(doc["due"]) - time.time() > 0:
                    # Not due yet: back to the end of the queue, so later records are not held up.
                    await ds.persist("requeue of an alert retry", lambda d=doc: ds.schedule_retry(d))
                    continue
            await ds.persist(f"retry of a {doc['kind']} to {doc['sink']}", lambda d=doc: ds.dispatcher().on_retry(d))

    return ds


async def _dispatch_all(ds: Downstream, docs: list[tuple[bool, float | None, dict[str, Any]]]) -> None:
    """Alerts and grade changes of one customer, in order (with their record timestamps)."""
    dispatcher = ds.dispatcher()
    for is_alert, produced_at, doc in docs:
        if is_alert:
            await ds.persist("alert dispatch", lambda d=doc, t=produced_at: dispatcher.on_alert(d, t))
        else:
            await ds.persist("recovery dispatch", lambda d=doc: dispatcher.on_change(d))
