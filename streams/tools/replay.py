"""``gradeflow replay HISTORY.jsonl``: produce a history into the input topics, at a rate or as fast as possible.

A history is JSON Lines of transactions and interactions as producers write them (the format
``gradeflow rules try`` reads), each line sent to the topic its ``type`` belongs to, keyed by its
``customer_id``, in the file's order. A line that is not valid JSON is sent as it is, to the
transactions topic, so that the worker dead-letters it as it would a producer's. ``--wait`` then
waits until the worker's consumer group has committed every record sent (it graded them).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from schemas.events import INTERACTION_TYPES

_INTERACTIONS = frozenset(INTERACTION_TYPES)


def route(line: bytes) -> tuple[bool, bytes | None]:
    """(is an interaction, key) of one history line: the rule ``rules try`` reads a history with."""
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False, None
    if not isinstance(doc, dict):
        return False, None
    kind, customer = doc.get("type"), doc.get("customer_id")
    interaction = isinstance(kind, str) and kind in _INTERACTIONS and "amount" not in doc
    return interaction, customer.encode() if isinstance(customer, str) else None


@dataclass
class Replayed:
    sent: int
    transactions: int
    interactions: int
    seconds: float
    graded: bool | None = None  # with --wait: whether the group committed everything before the timeout


def count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def producer_for(settings: Any) -> Any:
    from kafka import KafkaProducer

    from streams.kafka_config import kafka_python_options

    # acks=all and one request in flight: the order of the file is the order on each partition.
    return KafkaProducer(**kafka_python_options(settings), acks="all", linger_ms=5, batch_size=256 * 1024,
                         max_in_flight_requests_per_connection=1)


def replay(settings: Any, path: str | Path, rate: float | None = None, progress: bool = True,
           on_sent: Callable[[int], None] | None = None) -> Replayed:
    """Send every line of ``path``; ``rate``: events a second (None: as fast as the broker takes them)."""
    from tqdm import tqdm

    path = Path(path)
    total = count_lines(path)
    topics = settings.topics
    p = producer_for(settings)
    bar = tqdm(total=total, unit="events", desc="replay", file=sys.stderr, disable=not progress, smoothing=0.1)
    sent = interactions = 0
    started = time.monotonic()
    try:
        with open(path, "rb") as handle:
            for line in handle:
                raw = line.strip()
                if not raw:
                    continue
                interaction, key = route(raw)
                p.send(topics.interactions if interaction else topics.transactions, key=key, value=raw)
                sent += 1
                interactions += interaction
                bar.update(1)
                if on_sent is not None:
                    on_sent(sent)
                if rate:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)  # pacing the stream is the point here
        p.flush()
    finally:
        bar.close()
        p.close()
    return Replayed(sent, sent - interactions, interactions, time.monotonic() - started)


def remaining(settings: Any) -> int | None:
    """Records of the input topics the app's group has not committed yet (None: the group committed nothing)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.admin import KafkaAdminClient

    from streams.kafka_config import kafka_python_options

    options = kafka_python_options(settings)
    admin = KafkaAdminClient(**options)
    consumer = KafkaConsumer(**options, group_id=None, enable_auto_commit=False)
    try:
        names = (settings.topics.transactions, settings.topics.interactions)
        tps = [TopicPartition(t, p) for t in names for p in sorted(consumer.partitions_for_topic(t) or ())]
        end = consumer.end_offsets(tps)
        committed = admin.list_consumer_group_offsets(settings.group_id)
        if not committed:
            return None
        return sum(max(0, end[tp] - (committed[tp].offset if tp in committed else 0)) for tp in tps)
    finally:
        consumer.close()
        admin.close()


def wait_graded(settings: Any, timeout_s: float, progress: bool = True) -> bool:
    """Wait until the group's committed offsets reach the end of the input topics; False at the timeout."""
    from tqdm import tqdm

    deadline = time.monotonic() + timeout_s
    bar = tqdm(desc="graded", unit="events", file=sys.stderr, disable=not progress)
    first: int | None = None
    try:
        while True:
            left = remaining(settings)
            if left is not None:
                first = left if first is None else max(first, left)
                bar.total = first
                bar.n = first - left
                bar.refresh()
                if left == 0:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)  # polling the group coordinator, with a deadline
    finally:
        bar.close()
