"""streams/population.py without a broker: sketches per partition from a table, and merging what arrives."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from rules import population as pop
from streams.population import Population

from tests.rules.presethelp import local, preset, state_of, txn


class States:
    """States held per partition, as the worker's store yields them: (key, partition, state bytes)."""

    def __init__(self, held: dict[bytes, tuple[int, bytes]]) -> None:
        self.held = held

    def partition_items(self, partitions):
        return [(key, p, raw) for key, (p, raw) in self.held.items() if p in partitions]


def _population(held=None) -> Population:
    settings = SimpleNamespace(group_id="g", partitions=4, replication_factor=1,
                               topics=SimpleNamespace(transactions="transactions"))
    return Population(settings, preset("key-account-abc"), States(held or {}))


def test_sketches_per_active_partition_and_merged_thresholds() -> None:
    rs = preset("key-account-abc")
    d0 = local("2026-03-01")
    # Partitions as any producer's partitioner may have put them: each state counts where it lives.
    held = {f"c{i}".encode(): ((i * 3) % 4,
                               state_of(rs, [txn(d0, "purchase", str(100 * (i + 1)), customer=f"c{i}")]).to_bytes())
            for i in range(200)}
    population = _population(held)
    every = asyncio.run(population.sketch_partitions({0, 1, 2, 3}))
    assert sorted(every) == [0, 1, 2, 3]
    assert sum(s["purchases.net.365d"].count for s in every.values()) == 200
    mine = asyncio.run(population.sketch_partitions({1, 3}))
    assert sorted(mine) == [1, 3]
    assert sum(s["purchases.net.365d"].count for s in mine.values()) == sum(
        1 for p, _ in held.values() if p in (1, 3))
    assert {p: every[p]["purchases.net.365d"].count for p in every} == {
        p: sum(1 for q, _ in held.values() if q == p) for p in range(4)}

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
