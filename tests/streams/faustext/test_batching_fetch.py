"""The worker consumer's fetch.max.wait.ms (streams.faustext.batching.BatchConsumerThread), on the local broker.

Faust builds its aiokafka consumer with a constant 1,500 ms; gradeflow sets the fetcher's wait
through a private attribute, so this checks that the value reaches the fetcher a started consumer
really uses (an aiokafka upgrade that renamed it would fail here, not silently fall back).
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from rules.engine import compile_ruleset
from rules.ruleset import load
from streams.app import create_app
from streams.tools.local import unique_env
from streams.settings import load_settings


async def _started_fetcher_wait(bootstrap: str, fausts: bool = False, **overrides: Any) -> int:
    """The wait of the fetcher of a started worker consumer; ``fausts``: of an app without a wait of its own."""
    env = unique_env("fetchwait")
    settings = load_settings(kafka_bootstrap=bootstrap, app_id=env["GRADEFLOW_APP_ID"], downstream=False, **overrides)
    app = create_app(settings, compile_ruleset(load("rfm-5")))
    if fausts:
        cast(Any, app).fetch_max_wait_ms = None  # set by create_app, not a Faust attribute
    thread = cast(Any, app.consumer)._new_consumer_thread()
    consumer = thread._create_worker_consumer(app.transport)
    await consumer.start()
    try:
        return consumer._fetcher._fetch_max_wait_ms
    finally:
        await consumer.stop()


def test_the_worker_consumer_fetches_with_the_configured_wait(bootstrap: str) -> None:
    assert load_settings().kafka_fetch_max_wait_ms == 20
    assert asyncio.run(_started_fetcher_wait(bootstrap)) == 20
    assert asyncio.run(_started_fetcher_wait(bootstrap, kafka_fetch_max_wait_ms=250)) == 250


def test_without_a_wait_of_its_own_the_app_keeps_fausts(bootstrap: str) -> None:
    # What the override changes: the consumer Faust's own thread builds.
    assert asyncio.run(_started_fetcher_wait(bootstrap, fausts=True)) == 1500


async def _started_isolation(bootstrap: str, guarantee: str) -> int:
    """The isolation level the fetcher of a started worker consumer reads with."""
    env = unique_env("isolation")
    settings = load_settings(kafka_bootstrap=bootstrap, app_id=env["GRADEFLOW_APP_ID"], downstream=False,
                             processing_guarantee=guarantee)
    app = create_app(settings, compile_ruleset(load("rfm-5")))
    thread = cast(Any, app.consumer)._new_consumer_thread()
    consumer = thread._create_worker_consumer(app.transport)
    await consumer.start()
    try:
        return consumer._fetcher._isolation_level
    finally:
        await consumer.stop()


def test_with_exactly_once_the_worker_consumer_reads_committed(bootstrap: str) -> None:
    # One consumer for the inputs, the changelogs (recovery) and the downstream agents' topics:
    # all read committed with exactly_once, none with at_least_once.
    from aiokafka.consumer.fetcher import READ_COMMITTED, READ_UNCOMMITTED

    assert asyncio.run(_started_isolation(bootstrap, "exactly_once")) == READ_COMMITTED
    assert asyncio.run(_started_isolation(bootstrap, "at_least_once")) == READ_UNCOMMITTED
