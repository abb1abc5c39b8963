"""Where the tests' kafka-python producers put a key (Kafka's Java default partitioner, murmur2), and
customer names that land on a chosen input partition. gradeflow itself never computes a partition
from a key: it keeps each state where its records arrive."""

from __future__ import annotations

from kafka.partitioner.default import murmur2


def partition_of(key: bytes, partitions: int) -> int:
    """The partition kafka-python's default partitioner (as Kafka's Java client) gives ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def customers_on(partition: int, n: int, partitions: int = 4, prefix: str = "cust") -> list[str]:
    """The first ``n`` names ``<prefix><i>`` whose key lands on ``partition`` of ``partitions``."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        name = f"{prefix}{i}"
        if partition_of(name.encode(), partitions) == partition:
            out.append(name)
        i += 1
    return out
