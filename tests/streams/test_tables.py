"""The table stores' offsets (streams/tables.py), without a broker; and a RocksDB restart with one."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import faust
import orjson
import pytest
from faust.types import TP

from streams.local import consume, faust_log_tables, produce, unique_env
from streams.tables import MEMORY_SCHEME, FaustStateStore, OffsetMemoryStore, store_url

CHANGELOG = "t-customer-state-changelog"


def _store() -> OffsetMemoryStore:
    app = faust.App("t", store=store_url("memory://"))
    table = app.Table("customer-state", partitions=4, key_type=bytes, value_type=bytes)
    assert isinstance(table.data, OffsetMemoryStore)
    return table.data


def _event(partition: int, offset: int, key: bytes, value: bytes | None) -> SimpleNamespace:
    message = SimpleNamespace(tp=TP(CHANGELOG, partition), partition=partition, offset=offset, value=value)
    return SimpleNamespace(message=message, key=key, value=value)


def test_memory_url_selects_the_offset_keeping_store_and_others_pass_through() -> None:
    assert store_url("memory://") == f"{MEMORY_SCHEME}://"
    assert store_url("rocksdb://") == "rocksdb://"


def test_a_new_store_holds_nothing_and_recovery_batches_move_its_offsets() -> None:
    store = _store()
    assert store.persisted_offset(TP(CHANGELOG, 0)) is None  # a new process reads from the beginning
    store.apply_changelog_batch([_event(0, 5, b"a", b"1"), _event(0, 6, b"b", b"2"), _event(1, 3, b"c", b"3")],
                                to_key=lambda k: k, to_value=lambda v: v)
    assert store.persisted_offset(TP(CHANGELOG, 0)) == 6
    assert store.persisted_offset(TP(CHANGELOG, 1)) == 3
    assert dict(store.data) == {b"a": b"1", b"b": b"2", b"c": b"3"}
    # Its own writes do not move them: records of another worker may sit below their offsets.
    store.set_persisted_offset(TP(CHANGELOG, 0), 9)
    assert store.persisted_offset(TP(CHANGELOG, 0)) == 6


def test_after_recovery_standby_partitions_are_kept_and_partitions_no_longer_held_are_forgotten() -> None:
    store = _store()
    store.apply_changelog_batch([_event(p, 10 + p, f"k{p}".encode(), b"v") for p in range(4)],
                                to_key=lambda k: k, to_value=lambda v: v)
    asyncio.run(store.on_recovery_completed({TP(CHANGELOG, 0)}, {TP(CHANGELOG, 2)}))
    assert set(store.data) == {b"k0", b"k2"}  # Faust's own memory store would drop k2 (a standby)
    assert store.persisted_offset(TP(CHANGELOG, 2)) == 12
    # A partition dropped here must be read from the beginning if it comes back.
    assert store.persisted_offset(TP(CHANGELOG, 1)) is None
    assert store.persisted_offset(TP(CHANGELOG, 3)) is None


def test_written_batches_record_the_offset_of_their_last_record() -> None:
    seen: list[tuple[TP, int]] = []
    data = SimpleNamespace(set_persisted_offset=lambda tp, offset: seen.append((tp, offset)))
    states = FaustStateStore(SimpleNamespace(data=data))
    metadata = [SimpleNamespace(topic=CHANGELOG, partition=2, offset=100),
                SimpleNamespace(topic=CHANGELOG, partition=3, offset=7), None]  # None: acks=0
    states.mark_written(metadata, [25, 1, 4])
    assert seen == [(TP(CHANGELOG, 2), 124), (TP(CHANGELOG, 3), 7)]


def _purchase(customer: str, event_id: str, day: int, amount: str) -> tuple[bytes, bytes]:
    return customer.encode(), orjson.dumps({
        "event_id": event_id, "customer_id": customer, "occurred_at": f"2026-01-{day:02d}T10:00:00+08:00",
        "type": "purchase", "amount": amount, "currency": "CNY"})


@pytest.mark.slow
def test_a_rocksdb_worker_restarted_on_its_volume_reads_only_the_changelog_tail(bootstrap: str, worker_factory) -> None:
    env = unique_env("rocks", GRADEFLOW_KAFKA_BOOTSTRAP=bootstrap, GRADEFLOW_STORE="rocksdb://",
                     GRADEFLOW_DOWNSTREAM="false")
    customers = [f"r{i:03d}" for i in range(80)]
    changes_topic = env["GRADEFLOW_TOPIC_GRADE_CHANGES"]
    first = worker_factory(env, name="first")
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], (_purchase(c, f"a-{c}", 1, "100") for c in customers))
    assert len(list(consume(bootstrap, [changes_topic], until=len(customers), idle_s=30))) == len(customers)
    first.stop()  # graceful: a rolling restart, same volume

    again = worker_factory(env, name="again")
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], (_purchase(c, f"b-{c}", 2, "50000") for c in customers))
    docs = [orjson.loads(v) for _t, _k, v in consume(bootstrap, [changes_topic], until=2 * len(customers), idle_s=30)]
    second = {d["customer_id"]: d for d in docs if d["cause"]["event_id"].startswith("b-")}
    assert set(second) == set(customers)
    assert all(d["direction"] == "upgrade" and d["metrics"]["frequency"] == 2 for d in second.values())

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
