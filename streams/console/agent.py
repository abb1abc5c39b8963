"""The ``console-feed`` agent: output topics → what the console reads from Redis (streams/console/feed.py)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import orjson

from streams.console.feed import Feed
from streams.settings import redis_prefix

log = logging.getLogger("gradeflow.console")


def feed_of(downstream: Any) -> Feed:
    """The downstream's Feed (one per app, on its Redis client)."""
    feed = getattr(downstream, "console_feed", None)
    if feed is None:
        feed = downstream.console_feed = Feed(downstream.redis(), redis_prefix(downstream.settings))
    return feed


def attach_feed(app: Any, settings: Any, downstream: Any) -> None:
    """Register the agent. It shares the app's consumer group, acknowledges after Redis took a batch, and
    gives work up unacknowledged when the worker stops or rebalances (as the other downstream agents)."""
    from streams.downstream.wiring import Released, release

    names = settings.topics
    topics = app.topic(names.grade_changes, names.alerts, names.dead_letters, key_type=bytes, value_type=bytes)

    @app.agent(topics, name="console-feed")
    async def console_feed(stream: Any) -> None:
        async for events in downstream.batches(stream, 500):
            changes, alerts, dead = [], [], []
            for event in events:
                m = event.message
                try:
                    doc = orjson.loads(m.value)
                except orjson.JSONDecodeError:
                    continue  # the other agents say so in the log
                if not isinstance(doc, dict):
                    continue
                if m.topic == names.grade_changes:
                    changes.append(doc)
                elif m.topic == names.alerts:
                    alerts.append(doc)
                else:
                    dead.append(doc)
            try:
                await downstream.persist("console feed",
                                         functools.partial(feed_of(downstream).record, changes, alerts, dead))
            except Released:
                release(events)
