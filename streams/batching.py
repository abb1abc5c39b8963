"""Batch delivery of the input topics, inside Faust's own consumer.

Faust hands records to agents one at a time: each record becomes an Event that
crosses two coroutine hand-offs and an asyncio queue, and the consumer's drain
loop wraps every record in ``wait_first`` (two tasks). Measured here that
machinery alone caps a worker at a few thousand records/s, a hundredth of
what the broker delivers, before any grading is done.

:class:`BatchConsumer` keeps everything else Faust does (group membership,
rebalancing, table recovery from changelogs, offset commits with gap
tracking, flow control during recovery) and changes one thing: records of the
topics registered with :func:`deliver_in_batches` are collected per fetch and
handed to one coroutine as a list; records of every other topic go through
Faust's normal path. The handler acks the records when their effects are
durable; Faust commits acked offsets as usual, and a rebalance waits for
unacked records (``wait_empty``) exactly as it does for agents.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from mode import Service

BatchHandler = Callable[[list[Any]], Awaitable[None]]


class BatchConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer with a batch path for selected topics."""

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised by broker tests
        handler: BatchHandler | None = getattr(self.app, "_gradeflow_batch_handler", None)
        batch_topics: frozenset[str] = getattr(self.app, "_gradeflow_batch_topics", frozenset())
        if handler is None:
            await super()._drain_messages(fetcher)
            return
        callback = self.callback
        consumer_stopped = cast(Service, self)._stopped.is_set
        fetcher_stopped = cast(Service, fetcher)._stopped.is_set
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        unacked = self._unacked_messages
        commit_every = self._commit_every
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                await self.sleep(0)
                if self.should_stop:
                    break
                batch: list[Any] = []
                async for tp, message in self.getmany(timeout=1.0):
                    offset = message.offset
                    last = read_offset[tp]
                    if last is not None and offset < last:
                        continue  # already delivered before a seek
                    if last is not None and offset - last > 1 and acks_enabled_for(message.topic):
                        # Compaction or transaction markers leave holes; Faust
                        # must know them or committed offsets stop advancing.
                        await self._add_gap(tp, last + 1, offset)
                    read_offset[tp] = offset
                    if message.topic in batch_topics:
                        unacked.add(message)
                        batch.append(message)
                    else:
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                if batch:
                    await handler(batch)
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


class BatchTransport(aiokafka_driver.Transport):
    """The aiokafka transport, with :class:`BatchConsumer`."""

    Consumer = BatchConsumer


class BatchingApp(faust.App):
    """A Faust app whose consumer can deliver chosen topics in batches."""

    def _new_transport(self) -> Any:
        return BatchTransport(self.conf.broker_consumer, self)


def deliver_in_batches(app: BatchingApp, topic: Any, handler: BatchHandler) -> None:
    """Subscribe ``app`` to ``topic`` and hand its records to ``handler`` a fetch at a time.

    The handler gets Faust ``Message`` objects and must ack each one
    (``app.consumer.ack(message)``) once its effects are durable.
    """
    app.topics.add(topic)
    app._gradeflow_batch_handler = handler  # type: ignore[attr-defined]
    app._gradeflow_batch_topics = frozenset(topic.topics)  # type: ignore[attr-defined]
