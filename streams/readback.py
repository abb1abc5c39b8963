"""Reading topics from their beginning to where they end now (kafka-python), for the tools that
rebuild or check from the log: ``gradeflow redis rebuild`` and ``gradeflow audit``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def read_to_end(consumer: Any, tps: list[Any], max_records: int = 5000) -> Iterator[tuple[Any, list[Any]]]:
    """Assign ``tps`` (TopicPartitions) to ``consumer``, read each from its beginning, and yield
    ``(tp, records)`` per poll, records below the partition's end offset as of the start only."""
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    end = consumer.end_offsets(tps)
    todo = {tp for tp in tps if end[tp] > 0}
    while todo:
        for tp, records in consumer.poll(timeout_ms=500, max_records=max_records).items():
            yield tp, [r for r in records if r.offset < end[tp]]
        for tp in list(todo):
            if consumer.position(tp) >= end[tp]:
                todo.discard(tp)
