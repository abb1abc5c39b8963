"""State writes and changelog offsets (streams/faustext/tables.py), without a broker; a RocksDB restart with one."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import faust
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from faust.types import TP

from schemas.errors import ConfigurationError
from streams.tools.local import consume, faust_log_tables, produce, unique_env
from streams.faustext.outbox import Outbox, Sent
from streams.faustext.state_index import StateIndex
from streams.clock import stream_key
from streams.faustext.tables import FaustStateStore, IndexedMemoryStore
from tests.streams.producerhelp import RecordingProducer

CHANGELOG = "t-customer-state-changelog"


# gradeflow's memory store: Faust's over a StateIndex (what GRADEFLOW_STORE=memory:// runs).
MEMORY_STORES = ["gradeflow-memory://"]


def _memory_table(url: str = "gradeflow-memory://") -> tuple[faust.App, Any]:
    """An app and its table; the table is Any: the tests read its store's internals (``data``)."""
    app = faust.App("t", store=url)
    return app, app.Table("customer-state", partitions=4, key_type=bytes, value_type=bytes)


def test_the_workers_memory_store_is_faust_s_over_the_state_index() -> None:
    from rules.engine import compile_ruleset
    from rules.ruleset import load
    from streams.app import create_app
    from streams.settings import load_settings

    app = create_app(load_settings(app_id="store-probe", store="memory://"), compile_ruleset(load("rfm-5")))
    data = cast(Any, app.tables["customer-state"]).data
    assert isinstance(data, IndexedMemoryStore) and isinstance(data.data, StateIndex)


def test_a_table_on_faust_s_dict_store_is_refused_with_the_store_to_use() -> None:
    _app, table = _memory_table("memory://")
    with pytest.raises(ConfigurationError, match="gradeflow-memory://, which GRADEFLOW_STORE=memory:// selects"):
        FaustStateStore(table).get_many(["a"])


@pytest.mark.parametrize("url", MEMORY_STORES)
def test_written_states_are_read_back_queued_per_changelog_partition_and_dropped_with_their_partition(url: str) -> None:
    _app, table = _memory_table(url)
    store = FaustStateStore(table)
    outbox = Outbox()
    raw = orjson.dumps({"v": 1})
    store.write_many(outbox, [(b"a", raw, 2), (b"b", b"2", 0), (b"c", b"3", 2)])
    assert store.get("a") == raw and store.get("b") == b"2" and store.get("zzz") is None
    assert outbox._by_tp == {(CHANGELOG, 2): [(b"a", raw), (b"c", b"3")], (CHANGELOG, 0): [(b"b", b"2")]}
    # Written again (only a new key's partition is recorded), and one new.
    store.write_many(outbox, [(b"b", b"22", 0), (b"c", b"33", 2), (b"d", b"4", 0)])
    assert table.data._key_partition == {b"a": 2, b"b": 0, b"c": 2, b"d": 0}
    # Faust's memory store forgets, after a recovery, the keys of partitions no longer active here.
    asyncio.run(table.data.on_recovery_completed({TP(CHANGELOG, 2)}, set()))
    assert store.get("a") == raw and store.get("c") == b"33" and store.get("b") is None and store.get("d") is None
    assert store.get_many(["c", "b", "a"]) == [b"33", None, raw]
    assert table.data._key_partition == {b"a": 2, b"c": 2}


@pytest.mark.parametrize("url", MEMORY_STORES)
def test_a_batch_read_then_written_back_holds_the_new_states_and_records_new_keys_partitions(url: str) -> None:
    _app, table = _memory_table(url)
    store = FaustStateStore(table)
    store.write_many(Outbox(), [(f"c{i}".encode(), b"old", i % 4) for i in range(50)])
    customers = [f"c{i}" for i in range(40, 60)]  # ten known, ten new
    assert store.get_many(customers) == [b"old"] * 10 + [None] * 10
    outbox = Outbox()
    store.write_many(outbox, [(c.encode(), f"new-{c}".encode(), 3) for c in customers])
    assert store.get_many(customers) == [f"new-{c}".encode() for c in customers]
    assert store.get("c0") == b"old" and len(table.data) == 60
    # A known key keeps the partition it was first seen on; only the new ones are recorded.
    assert table.data._key_partition[b"c41"] == 1 and table.data._key_partition[b"c55"] == 3
    assert sum(len(records) for records in outbox._by_tp.values()) == 20


def test_settled_batches_record_the_offset_of_their_last_record() -> None:
    seen: list[tuple[TP, int]] = []
    data = SimpleNamespace(set_persisted_offset=lambda tp, offset: seen.append((tp, offset)))
    store = FaustStateStore(SimpleNamespace(data=data))
    metadata = [SimpleNamespace(topic=CHANGELOG, partition=2, offset=100),
                SimpleNamespace(topic=CHANGELOG, partition=3, offset=7), None]  # None: acks=0

    async def settle() -> None:
        futures = [asyncio.get_running_loop().create_future() for _ in metadata]
        for future, result in zip(futures, metadata):
            future.set_result(result)
        await store.settle(Sent(futures, [25, 1, 4]))

    asyncio.run(settle())
    assert seen == [(TP(CHANGELOG, 2), 124), (TP(CHANGELOG, 3), 7)]


def _purchase(customer: str, event_id: str, day: int, amount: str) -> tuple[bytes, bytes]:
    return customer.encode(), orjson.dumps({
        "event_id": event_id, "customer_id": customer, "occurred_at": f"2026-01-{day:02d}T10:00:00+08:00",
        "type": "purchase", "amount": amount, "currency": "CNY"})


def _graded_across_a_restart(bootstrap: str, worker_factory, store: str, customers: list[str]) -> tuple[dict, Any]:
    """A worker grades a purchase of each customer and stops (gracefully: a rolling restart, the
    same volume); a new worker grades a second purchase of each. Returns the env and the new worker,
    having checked that each second purchase was graded on the recovered state (frequency 2)."""
    env = unique_env("restart", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_STORE=store,
                     GRADEFLOW_DOWNSTREAM="false")
    changes_topic = env["GRADEFLOW_TOPIC_GRADE_CHANGES"]
    first = worker_factory(env, name="first")
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], (_purchase(c, f"a-{c}", 1, "100") for c in customers))
    assert len(list(consume(bootstrap, [changes_topic], until=len(customers), idle_s=30))) == len(customers)
    first.stop()

    again = worker_factory(env, name="again")
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], (_purchase(c, f"b-{c}", 2, "50000") for c in customers))
    docs = [orjson.loads(v) for _t, _k, v in consume(bootstrap, [changes_topic], until=2 * len(customers), idle_s=30)]
    second = {d["customer_id"]: d for d in docs if d["cause"]["event_id"].startswith("b-")}
    assert set(second) == set(customers)
    assert all(d["direction"] == "upgrade" and d["metrics"]["frequency"] == 2 for d in second.values())
    return env, again


@pytest.mark.slow
def test_a_rocksdb_worker_restarted_on_its_volume_reads_only_the_changelog_tail(bootstrap: str, worker_factory) -> None:
    env, again = _graded_across_a_restart(bootstrap, worker_factory, "rocksdb://", [f"r{i:03d}" for i in range(80)])
    changelog = f"{env['GRADEFLOW_APP_ID']}-customer-state-changelog"
    log = again.log_path.read_text(errors="replace")
    starts = faust_log_tables(log, "Reading Starts At - Active")
    highwaters = faust_log_tables(log, "Highwater - Active")
    assert starts and highwaters, again.tail()
    start, high = starts[0][1], highwaters[0][1]
    partitions = [p for (topic, p), h in high.items() if topic == changelog and h >= 0]
    assert partitions, high
    for p in partitions:
        # -1 would be "from the beginning"; the store knows it holds everything up to the highwater.
        assert start[(changelog, p)] >= high[(changelog, p)], (p, start, high)


@pytest.mark.slow
def test_a_memory_worker_restarted_recovers_every_state_a_fetch_at_a_time(bootstrap: str, worker_factory) -> None:
    import re

    customers = [f"m{i:03d}" for i in range(300)]
    _env, again = _graded_across_a_restart(bootstrap, worker_factory, "memory://", customers)
    # The memory store holds nothing across a restart: every state came back from the changelog
    # (the second purchases were graded on it), through the consumer's bulk path
    # (streams/faustext/recovery.py), not Faust's record-by-record one.
    log = again.log_path.read_text(errors="replace")
    applied = [int(n) for n in re.findall(r"tables recovered; (\d+) changelog records applied", log)]
    assert applied and applied[-1] >= len(customers), again.tail()


@pytest.mark.parametrize("store_url", [*MEMORY_STORES, "rocksdb://"])
def test_partition_items_are_exactly_the_states_held_for_those_partitions(store_url: str, tmp_path) -> None:
    app = faust.App("t", store=store_url, datadir=str(tmp_path))
    table = app.Table("customer-state", partitions=4, key_type=bytes, value_type=bytes)
    store = FaustStateStore(table)
    # Partitions as any producer may have chosen them; the table's own keys (streams/clock.py) beside.
    written = {f"c{i:03d}".encode(): (f"state-{i}".encode(), (i * 3) % 4) for i in range(40)}
    store.write_many(Outbox(), [(key, raw, partition) for key, (raw, partition) in written.items()]
                     + [(stream_key(p), b"1.5", p) for p in range(4)])
    for wanted in ({1}, {0, 3}, set()):
        got = {key: (raw, partition) for key, partition, raw in store.partition_items(wanted)}
        assert got == {key: (raw, partition) for key, (raw, partition) in written.items() if partition in wanted}
    assert {key: store.partition_of(key) for key in written} == {key: p for key, (_, p) in written.items()}
    assert store.partition_of(b"nobody") is None
    assert store.get_key(stream_key(2)) == b"1.5"


@pytest.mark.parametrize("url", MEMORY_STORES)
def test_replace_writes_only_states_nobody_changed_meanwhile_and_puts_them_on_the_changelog(url: str) -> None:
    _app, table = _memory_table(url)
    store = FaustStateStore(table)
    store.write_many(Outbox(), [(b"a", b"a1", 1), (b"b", b"b2", 2)])  # b: the handler moved on to b2
    producer = RecordingProducer()
    skipped = asyncio.run(store.replace(producer, [(b"a", b"a1", b"a-new", 1), (b"b", b"b1", b"b-new", 2),
                                                   (b"c", None, b"c-new", 3)]))  # type: ignore[list-item]
    assert skipped == [b"b"]
    assert (store.get("a"), store.get("b"), store.get("c")) == (b"a-new", b"b2", b"c-new")
    assert sorted(producer.sent) == [(CHANGELOG, 1, [(b"a", b"a-new")]), (CHANGELOG, 3, [(b"c", b"c-new")])]


@pytest.mark.parametrize("url", MEMORY_STORES)
def test_a_recovered_changelog_batch_leaves_each_keys_last_state_and_its_partition(url: str) -> None:
    _app, table = _memory_table(url)

    def record(key: bytes, value: bytes, partition: int) -> SimpleNamespace:
        return SimpleNamespace(key=key, value=value, message=SimpleNamespace(value=value, partition=partition))

    # A changelog holds every version of a state: the last one read wins, as in Faust's dict store.
    batch = [record(b"a", b"a1", 0), record(b"b", b"b1", 1), record(b"a", b"a2", 0), record(b"c", b"c1", 2)]
    table.data.apply_changelog_batch(batch, to_key=lambda k: k, to_value=lambda v: v)
    store = FaustStateStore(table)
    assert store.get_many(["a", "b", "c", "d"]) == [b"a2", b"b1", b"c1", None]
    assert table.data._key_partition == {b"a": 0, b"b": 1, b"c": 2}


_KEYS = st.sampled_from([b"a", b"b", b"c", b"d", b"e"])
_RECORDS = st.lists(st.tuples(_KEYS, st.one_of(st.none(), st.binary(min_size=1, max_size=3)), st.integers(0, 3)),
                    max_size=30)


@given(before=_RECORDS, batches=st.lists(_RECORDS, max_size=4))
@settings(max_examples=200, deadline=None)
def test_the_indexed_store_recovers_a_changelog_as_faust_s_dict_store_does(before, batches) -> None:
    # Batch writes and deletes (IndexedMemoryStore.apply_changelog_batch) against Faust's own
    # memory store, record by record: the same states, the same partitions, tombstones included
    # (a key deleted then written again in one batch stays).
    def events(records):
        return [SimpleNamespace(key=k, value=v, message=SimpleNamespace(value=v, partition=p)) for k, v, p in records]

    stores = []
    for url in ("memory://", "gradeflow-memory://"):  # Faust's own dict store, then gradeflow's
        _app, table = _memory_table(url)
        for records in [before, *batches]:
            table.data.apply_changelog_batch(events(records), to_key=lambda k: k, to_value=lambda v: v)
        stores.append(table.data)
    faust_store, indexed = stores
    assert dict(indexed.data.items()) == dict(faust_store.data)
    assert indexed._key_partition == faust_store._key_partition
