"""``gradeflow customers merge FROM INTO``: request a merge and, with ``--wait``, wait for its outcome."""

from __future__ import annotations

import time
from typing import Any

import orjson

from schemas.errors import ConfigurationError
from streams.merging import encode, request
from streams.settings import Settings, merges_topic


def request_merge(settings: Settings, from_id: str, into_id: str) -> tuple[str, int]:
    """Write the request to partition 0 of the merge topic; return its merge id and the partition's
    end offset from before it (where its outcome will be)."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from streams.kafka_config import kafka_python_options

    if not settings.customer_merges:
        raise ConfigurationError("merges are off: set GRADEFLOW_CUSTOMER_MERGES=true (on every worker too) first")
    if from_id == into_id:
        raise ConfigurationError("an id cannot be merged into itself")
    if not all(1 <= len(c) <= 256 for c in (from_id, into_id)):
        raise ConfigurationError("customer ids are 1 to 256 characters long")
    doc = request(from_id, into_id)
    topic = merges_topic(settings)
    options = kafka_python_options(settings)
    consumer = KafkaConsumer(**options, group_id=None, enable_auto_commit=False)
    try:
        if not consumer.partitions_for_topic(topic):
            raise ConfigurationError(f"topic {topic} is missing: start a worker with GRADEFLOW_CUSTOMER_MERGES=true, "
                                     f"or run `gradeflow topics create`")
        tp = TopicPartition(topic, 0)
        start = consumer.end_offsets([tp])[tp]
    finally:
        consumer.close()
    producer = KafkaProducer(**options, acks="all")
    try:
        producer.send(topic, key=doc.merge_id.encode(), value=encode(doc), partition=0)
        producer.flush()
    finally:
        producer.close()
    return doc.merge_id, start


def wait_outcome(settings: Settings, merge_id: str, start: int, timeout_s: float) -> dict[str, Any] | None:
    """The first outcome (step ``done`` or ``refused``) of ``merge_id`` on partition 0 of the merge
    topic after ``start``, within ``timeout_s``; None when there is none by then."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.kafka_config import kafka_python_options

    consumer = KafkaConsumer(**kafka_python_options(settings), group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(merges_topic(settings), 0)
        consumer.assign([tp])
        consumer.seek(tp, start)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    try:
                        doc = orjson.loads(record.value)
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(doc, dict) and doc.get("merge_id") == merge_id and doc.get("step") in ("done",
                                                                                                         "refused"):
                        return doc
    finally:
        consumer.close()
    return None
