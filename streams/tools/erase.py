"""``gradeflow customers erase ID...``: request erasures and, with ``--wait``, wait for their receipts."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any

import orjson

from schemas.errors import ConfigurationError
from streams.erasure import request
from streams.settings import Settings, erasure_topics


def request_erasures(settings: Settings, customer_ids: list[str]) -> tuple[dict[str, str], dict[int, int]]:
    """Write one request per customer to partition 0 of the request topic; return erasure id →
    customer id, and the receipt topic's end offsets from before the requests (where to look)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from streams.kafka_config import kafka_python_options

    if settings.erasure_key is None:
        raise ConfigurationError("erasure is off: set GRADEFLOW_ERASURE_KEY (the same on every worker) first")
    bad = [c for c in customer_ids if not 1 <= len(c) <= 256]
    if bad:
        raise ConfigurationError(f"{len(bad)} customer ids are not 1 to 256 characters long")
    names = erasure_topics(settings)
    options = kafka_python_options(settings)
    consumer = KafkaConsumer(**options, group_id=None, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(names.receipts)
        if not parts or not consumer.partitions_for_topic(names.requests):
            raise ConfigurationError(f"topics {names.requests} and {names.receipts} are missing: start a worker with "
                                     f"GRADEFLOW_ERASURE_KEY set, or run `gradeflow topics create`")
        tps = [TopicPartition(names.receipts, p) for p in sorted(parts)]
        start = {tp.partition: offset for tp, offset in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()
    producer = KafkaProducer(**options, acks="all")
    ids: dict[str, str] = {}
    try:
        at = datetime.now(timezone.utc)
        for customer_id in customer_ids:
            erasure_id = str(uuid.uuid4())
            producer.send(names.requests, key=erasure_id.encode(), value=request(customer_id, erasure_id, at),
                          partition=0)
            ids[erasure_id] = customer_id
        producer.flush()
    finally:
        producer.close()
    return ids, start


def wait_receipts(settings: Settings, erasure_ids: set[str], start: dict[int, int],
                  timeout_s: float) -> dict[str, dict[str, Any]]:
    """The first receipt of each of ``erasure_ids`` that arrives on the receipt topic after ``start`` within ``timeout_s``."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.kafka_config import kafka_python_options

    topic = erasure_topics(settings).receipts
    consumer = KafkaConsumer(**kafka_python_options(settings), group_id=None, enable_auto_commit=False)
    found: dict[str, dict[str, Any]] = {}
    try:
        tps = [TopicPartition(topic, p) for p in sorted(start)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start[tp.partition])
        deadline = time.monotonic() + timeout_s
        while len(found) < len(erasure_ids) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    try:
                        doc = orjson.loads(record.value)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(doc, dict) and doc.get("erasure_id") in erasure_ids:
                        # The first: a visit re-done after a takeover may repeat it, finding nothing left.
                        found.setdefault(doc["erasure_id"], doc)
    finally:
        consumer.close()
    return found
