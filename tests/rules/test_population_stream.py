"""streams/population.py without a broker: sketches per partition from a table, and merging what arrives."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from rules import population as pop
from streams.population import Population, partition_of

from tests.rules.presethelp import local, preset, state_of, txn


def _population(table=None) -> Population:
    settings = SimpleNamespace(group_id="g", partitions=4, replication_factor=1,
                               topics=SimpleNamespace(transactions="transactions"))
    return Population(settings, preset("key-account-abc"), table if table is not None else {})


def test_partition_of_matches_kafkas_default_partitioner() -> None:
    # Values of Kafka's murmur2 partitioner (Java DefaultPartitioner) for these keys over 4 partitions.
    from kafka.partitioner.default import DefaultPartitioner

    for key in (b"ann", b"ben", b"c-001", "客户".encode()):
        assert partition_of(key, 4) == DefaultPartitioner()(key, list(range(4)), list(range(4)))


def test_sketches_per_active_partition_and_merged_thresholds() -> None:
    rs = preset("key-account-abc")
    d0 = local("2026-03-01")
    table = {f"c{i}".encode(): state_of(rs, [txn(d0, "purchase", str(100 * (i + 1)), customer=f"c{i}")]).to_bytes()
             for i in range(200)}
    population = _population(table)
    every = asyncio.run(population.sketch_partitions({0, 1, 2, 3}, 4))
    assert sorted(every) == [0, 1, 2, 3]
    assert sum(s["purchases.net.365d"].count for s in every.values()) == 200
    mine = asyncio.run(population.sketch_partitions({1, 3}, 4))
    assert sorted(mine) == [1, 3]
    assert sum(s["purchases.net.365d"].count for s in mine.values()) == sum(
        1 for k in table if partition_of(k, 4) in (1, 3))

    # What every worker does with the topic: the latest sketch per partition, merged.
    follower = _population()
    for p, sketches in every.items():
        follower.apply(f"key-account-abc@1/{p}".encode(), pop.encode(sketches))
    exact95 = sorted(100_00 * (i + 1) for i in range(200))[int(0.95 * 199)]
    got = follower.thresholds[("purchases.net.365d", 0.95)]
    assert abs(got - exact95) <= pop.RELATIVE_ACCURACY * exact95 + 100_00
    # Other rulesets' or versions' sketches are ignored; a tombstone removes a partition.
    assert not follower.apply(b"key-account-abc@2/0", pop.encode(every[0]))
    assert not follower.apply(b"rfm-8-median@1/0", pop.encode(every[0]))
    before = dict(follower.thresholds)
    for p in (0, 1, 2):
        follower.apply(f"key-account-abc@1/{p}".encode(), None)
    assert follower.thresholds != before and follower.latest.keys() == {"key-account-abc@1/3"}
    assert not follower.apply(b"key-account-abc@1/9", b"not a sketch")
