"""Customer names that land on a chosen input partition (Kafka's default partitioner, murmur2)."""

from __future__ import annotations

from streams.population import partition_of


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
