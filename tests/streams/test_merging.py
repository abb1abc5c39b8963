"""Identity merges without a broker (streams/merging.py): every step of a merge over a simulated
cluster whose worker dies at each possible point (each send to the broker), then restarts from
what was durable (the changelog) and the committed offsets. The merged customer always ends with
the state and grades of one customer fed the union of both ids' events."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from rules.merge import ENDED, TERMINAL_GRADE
from rules.state import CustomerState
from schemas.events import CustomerMerge, GradeChange
from streams.faustext.outbox import Outbox
from streams.handler import BatchGrader
from streams.merging import Merging, encode, request
from streams.processor import TRANSACTIONS, Record, process_batch
from streams.settings import load_settings
from tests.streams.producerhelp import RecordingProducer
from tests.streams.test_processor import NOW, RS, DictStore

MERGES = "customer-merges"
CHANGELOG = "changelog"


class Crash(Exception):
    """The worker process died."""


class Table:
    """The state table of the cluster: what the workers hold (``held``) and what the changelog
    has (``durable``); a restart rebuilds the former from the latter."""

    def __init__(self) -> None:
        self.held: dict[bytes, tuple[int, bytes]] = {}
        self.durable: dict[bytes, tuple[int, bytes]] = {}

    def holds(self, key: bytes, partition: int) -> bool:
        got = self.held.get(key)
        return got is not None and got[0] == partition

    def get_key(self, key: bytes) -> bytes | None:
        got = self.held.get(key)
        return None if got is None else got[1]

    def get(self, customer_id: str) -> bytes | None:
        return self.get_key(customer_id.encode())

    def write_many(self, outbox: Outbox, states: Iterable[tuple[bytes, bytes, int]]) -> None:
        for key, raw, partition in states:
            self.held[key] = (partition, raw)
            outbox.add(CHANGELOG, key, raw, partition)

    async def settle(self, sent: Any) -> None:
        await sent.acked()

    def restart(self) -> None:
        self.held = dict(self.durable)


class Broker(RecordingProducer):
    """Every topic, as sent; dies (raises :class:`Crash`) at the send ``crash_at`` (None: never)."""

    def __init__(self, table: Table) -> None:
        super().__init__()
        self.table = table
        self.crash_at: int | None = None
        self.sends = 0
        self.topics: dict[tuple[str, int], list[tuple[bytes, bytes]]] = {}

    async def send_batch(self, batch: Any, topic: str, partition: int) -> asyncio.Future[Any]:
        if self.crash_at is not None and self.sends >= self.crash_at:
            raise Crash()
        self.sends += 1
        self.topics.setdefault((topic, partition), []).extend(batch.records)
        if topic == CHANGELOG:
            for key, raw in batch.records:
                self.table.durable[key] = (partition, raw)
        return await super().send_batch(batch, topic, partition)


class NoClock:
    """The clock off (streams/clock.py): nothing scheduled."""

    look_horizon = None

    def __init__(self) -> None:
        self.pending: dict[bytes, Any] = {}
        self.schedules: dict[int, Any] = {}

    def stream_times(self, partitions: set[int]) -> None:
        return None

    def advanced(self, stream_time: dict[int, float]) -> list:
        return []

    def note(self, looks: dict, states: dict) -> None:
        return None


class Cluster:
    """Workers over the table and the broker; ``committed``: the merge topic's committed offsets."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.table = Table()
        self.broker = Broker(self.table)
        self.committed: dict[int, int] = {}
        self.counters = SimpleNamespace(consumed=0, applied=0, duplicates=0, replayed=0, dead_lettered=0, refused=0,
                                        forwarded=0, grade_changes=0, alerts=0)
        self.restarts = 0
        self.start()

    def start(self) -> None:
        writer = asyncio.Lock()
        self.grader = BatchGrader(self.settings, RS, self.table, NoClock(), None, writer, lambda: self.broker)
        self.grader.merges_topic = MERGES
        self.merging = Merging(self.settings, RS, self.table, NoClock(), None, writer, lambda: self.broker,
                               self.grader, self.counters)

    def restart(self) -> None:
        self.restarts += 1
        self.broker.crash_at = None
        self.table.restart()
        self.start()

    async def grade(self, records: list[Record]) -> None:
        while True:
            try:
                _result, written = await self.grader.grade(records)
                if written is not None:
                    await self.table.settle(written)
                return
            except Crash:
                self.restart()  # the input records are redelivered

    async def drain(self, until_crash: bool = False) -> None:
        """Do every merge step on the topic, in each partition's order, a restart after any crash
        (with ``until_crash``, return right after the restart)."""
        while True:
            pending = [(p, self.committed.get(p, 0)) for p in range(self.settings.partitions)
                       if self.committed.get(p, 0) < len(self.broker.topics.get((MERGES, p), []))]
            if not pending:
                return
            p, offset = pending[0]
            _key, raw = self.broker.topics[(MERGES, p)][offset]
            try:
                await self.merging.step(raw, p, offset)
                self.committed[p] = offset + 1
            except Crash:
                self.restart()
                if until_crash:
                    return

    def changes(self, customer: str) -> list[dict[str, Any]]:
        out = []
        for (topic, _p), records in self.broker.topics.items():
            if topic == "grade-changes":
                out += [orjson.loads(v) for k, v in records if k == customer.encode()]
        return out

    def outcomes(self) -> list[CustomerMerge]:
        docs = [CustomerMerge.model_validate_json(v) for _k, v in self.broker.topics.get((MERGES, 0), [])]
        return [d for d in docs if d.step in ("done", "refused")]


def txn(customer: str, partition: int, offset: int, when: str, amount: str, event_id: str) -> Record:
    doc = {"event_id": event_id, "customer_id": customer, "occurred_at": when, "type": "purchase",
           "amount": amount, "currency": "CNY"}
    return Record(TRANSACTIONS, "transactions", partition, offset, customer.encode(), orjson.dumps(doc))


INTO, FROM = "alice", "bob"
INTO_EVENTS = [("2026-01-10T10:00:00+08:00", "900.00"), ("2026-02-01T10:00:00+08:00", "40.00"),
               ("2026-03-03T10:00:00+08:00", "12000.00")]
FROM_EVENTS = [("2026-01-20T10:00:00+08:00", "300.00"), ("2026-02-15T10:00:00+08:00", "45000.00"),
               ("2026-02-20T10:00:00+08:00", "80.00")]
LATER = ("2026-03-10T10:00:00+08:00", "5000.00")


def union_state(extra: Sequence[tuple[str, str]] = ()) -> tuple[CustomerState, dict[str, str]]:
    """One customer fed the events of both ids (and ``extra``), offline; its state and grades."""
    records = [txn(INTO, 0, i, when, amount, f"a{i}") for i, (when, amount) in enumerate(INTO_EVENTS)]
    records += [txn(INTO, 0, 10 + i, when, amount, f"b{i}") for i, (when, amount) in enumerate(FROM_EVENTS)]
    records += [txn(INTO, 0, 20 + i, when, amount, f"later{i}") for i, (when, amount) in enumerate(extra)]
    records.sort(key=lambda r: orjson.loads(r.value or b"")["occurred_at"])
    store = DictStore()
    for n, record in enumerate(records):
        record.offset = n
        store.save(process_batch([record], RS, store, NOW))
    state = CustomerState.from_bytes(store[INTO])
    return state, state.grades


FACTS = ("last_event_ts", "last_purchase_ts", "first_purchase_ts", "buckets", "interaction_counts", "seen")


def facts(state: CustomerState) -> dict[str, Any]:
    return {name: getattr(state, name) for name in FACTS}


async def scenario(crash_at: int | None) -> Cluster:
    settings = load_settings(customer_merges=True, partitions=4)
    cluster = Cluster(settings)
    await cluster.grade([txn(INTO, 1, i, when, amount, f"a{i}") for i, (when, amount) in enumerate(INTO_EVENTS)])
    await cluster.grade([txn(FROM, 2, i, when, amount, f"b{i}") for i, (when, amount) in enumerate(FROM_EVENTS)])
    cluster.broker.sends, cluster.broker.crash_at = 0, crash_at
    doc = request(FROM, INTO, merge_id="m-1")
    cluster.broker.topics.setdefault((MERGES, 0), []).append((b"m-1", encode(doc)))
    await cluster.drain()
    # A later event of FROM, on FROM's partition: graded as INTO's.
    await cluster.grade([txn(FROM, 2, len(FROM_EVENTS), LATER[0], LATER[1], "later0")])
    await cluster.drain()
    return cluster


def check(cluster: Cluster) -> None:
    held = cluster.table.held
    merged = CustomerState.from_bytes(held[INTO.encode()][1])
    expected, grades = union_state([LATER])
    assert facts(merged) == facts(expected)
    assert merged.grades == grades
    assert merged.merges == {"m-1": FROM}
    ended = CustomerState.from_bytes(held[FROM.encode()][1])
    assert ended.merged_into == [INTO, "m-1", 1] and ended.grades == {} and ended.buckets == {}
    # FROM's last change on each ladder is the terminal one; nothing after it.
    bob = cluster.changes(FROM)
    for change in bob:
        GradeChange.model_validate(change)
    last = {c["ladder"]: c for c in bob}
    assert {c["grade"] for c in last.values()} == {TERMINAL_GRADE}
    assert all(c["direction"] == ENDED and c["cause"] == {"kind": "merge", "event_id": "m-1"} for c in last.values())
    # INTO's published grades end where the state is, the merge re-grade among them.
    alice = cluster.changes(INTO)
    assert {c["ladder"]: c["grade"] for c in alice} == merged.grades
    outcomes = cluster.outcomes()
    assert outcomes and all(o.step == "done" for o in outcomes)
    assert cluster.counters.forwarded == 0  # FROM's later event was forwarded by the handler, applied here
    assert cluster.counters.applied == 1


def test_a_merge_combines_both_ids_and_forwards_the_later_events() -> None:
    cluster = asyncio.run(scenario(None))
    check(cluster)
    assert cluster.restarts == 0
    kinds = [c["cause"]["kind"] for c in cluster.changes(INTO)]
    assert "merge" in kinds  # the re-grade of the combined facts changed a grade


def test_a_worker_dying_at_any_send_of_a_merge_ends_the_same() -> None:
    sends = asyncio.run(scenario(None)).broker.sends  # every send of the merge and the forwarded event
    assert sends >= 10
    for crash_at in range(sends):
        cluster = asyncio.run(scenario(crash_at))
        check(cluster)
        assert cluster.restarts == 1, crash_at


async def scenario_event_between(crash_at: int) -> Cluster:
    """The worker dies at the ``crash_at``-th send of the merge; FROM's later event is graded after
    the restart and before the merge steps are done again (the handler and the merge steps are
    two agents: nothing orders them)."""
    settings = load_settings(customer_merges=True, partitions=4)
    cluster = Cluster(settings)
    await cluster.grade([txn(INTO, 1, i, when, amount, f"a{i}") for i, (when, amount) in enumerate(INTO_EVENTS)])
    await cluster.grade([txn(FROM, 2, i, when, amount, f"b{i}") for i, (when, amount) in enumerate(FROM_EVENTS)])
    cluster.broker.sends, cluster.broker.crash_at = 0, crash_at
    cluster.broker.topics.setdefault((MERGES, 0), []).append((b"m-1", encode(request(FROM, INTO, merge_id="m-1"))))
    await cluster.drain(until_crash=True)
    await cluster.grade([txn(FROM, 2, len(FROM_EVENTS), LATER[0], LATER[1], "later0")])
    await cluster.drain()
    return cluster


def test_an_event_of_the_merged_away_id_between_a_crash_and_the_redo_is_not_lost() -> None:
    sends = asyncio.run(scenario(None)).broker.sends
    for crash_at in range(sends):
        cluster = asyncio.run(scenario_event_between(crash_at))
        held = cluster.table.held
        merged = CustomerState.from_bytes(held[INTO.encode()][1])
        expected, grades = union_state([LATER])
        assert facts(merged) == facts(expected), crash_at
        assert merged.grades == grades, crash_at
        last = {c["ladder"]: c for c in cluster.changes(FROM)}
        assert {c["grade"] for c in last.values()} == {TERMINAL_GRADE}, (crash_at, cluster.changes(FROM))


def test_a_merge_of_an_unknown_id_or_into_itself_is_refused_and_changes_nothing() -> None:
    async def run() -> Cluster:
        cluster = Cluster(load_settings(customer_merges=True, partitions=4))
        await cluster.grade([txn(INTO, 1, 0, *INTO_EVENTS[0], "a0")])
        before = dict(cluster.table.held)
        for n, (a, b) in enumerate([("nobody", INTO), (INTO, "nobody"), (INTO, INTO)]):
            doc = request(a, b, merge_id=f"m-{n}")
            cluster.broker.topics.setdefault((MERGES, 0), []).append((doc.merge_id.encode(), encode(doc)))
        await cluster.drain()
        assert cluster.table.held == before
        return cluster

    outcomes = sorted(asyncio.run(run()).outcomes(), key=lambda o: o.merge_id)
    assert [o.step for o in outcomes] == ["refused"] * 3
    assert "no state held for nobody" in (outcomes[0].reason or "")
    assert "itself" in (outcomes[2].reason or "")


def test_erasing_the_merged_customer_erases_the_merged_away_id_too(clean_env: Any) -> None:
    from datetime import datetime, timezone

    from streams.erasure import Erasure
    from streams.erasure import request as erasure_request

    async def run() -> tuple[Cluster, list[str]]:
        cluster = await scenario(None)
        table = cluster.table

        def delete_many(outbox: Outbox, keys: Iterable[tuple[bytes, int]]) -> None:
            for key, partition in keys:
                table.held.pop(key, None)
                outbox.add(CHANGELOG, key, None, partition)

        table.delete_many = delete_many  # type: ignore[attr-defined]
        settings = load_settings(customer_merges=True, partitions=4, erasure_key="k" * 32)
        erasure = Erasure(None, settings, table, NoClock(), asyncio.Lock(), lambda: cluster.broker)
        requests = erasure.topics.requests
        queue = cluster.broker.topics.setdefault((requests, 0), [])
        queue.append((b"e-1", erasure_request(INTO, "e-1", datetime.now(timezone.utc))))
        done: dict[int, int] = {}
        while True:  # every request's visits, each partition in order
            pending = [p for p in range(4) if done.get(p, 0) < len(cluster.broker.topics.get((requests, p), []))]
            if not pending:
                break
            p = pending[0]
            _key, raw = cluster.broker.topics[(requests, p)][done.get(p, 0)]
            await erasure.visit(raw, p)
            done[p] = done.get(p, 0) + 1
        receipts = [orjson.loads(v)["customer_id"] for _k, v in cluster.broker.topics[(erasure.topics.receipts, 0)]]
        return cluster, receipts

    cluster, receipts = asyncio.run(run())
    assert sorted(receipts) == [INTO, FROM]
    assert INTO.encode() not in cluster.table.held and FROM.encode() not in cluster.table.held


def test_the_processor_forwards_every_event_of_a_merged_away_id_and_counts_it() -> None:
    from rules.erasure import Erasures
    from rules.merge import marker

    store = DictStore({FROM: marker(INTO, "m-1", 1).to_bytes()})
    records = [txn(FROM, 2, 0, "2026-01-20T10:00:00+08:00", "300.00", "b0"),
               txn(FROM, 2, 1, "2026-04-20T10:00:00+08:00", "80.00", "b1"),
               txn(INTO, 2, 2, "2026-01-20T10:00:00+08:00", "300.00", "a0")]
    result = process_batch(records, RS, store, NOW)
    assert [(r.offset, m) for r, m in result.forwarded] == [(0, [INTO, "m-1", 1]), (1, [INTO, "m-1", 1])]
    assert (result.consumed, result.applied, len(result.forwarded)) == (3, 1, 2) and result.reconciled
    assert FROM not in result.states and not [k for k, _v in result.grade_changes if k == FROM.encode()]
    # FROM erased later: its events from before the erasure are refused, not forwarded.
    erasures = Erasures(b"s" * 32)
    erasures.erase(FROM, datetime.fromisoformat("2026-03-01T00:00:00+08:00").timestamp())
    result = process_batch(records, RS, store, NOW, erased=erasures)
    assert (result.refused, len(result.forwarded)) == (1, 1) and result.reconciled


def test_the_merge_topic_is_declared_only_when_merges_are_on(clean_env: Any) -> None:
    from schemas.errors import ConfigurationError
    from streams.tools.merge import request_merge
    from streams.topics import topic_specs

    plain = {s.name for s in topic_specs(load_settings())}
    specs = {s.name: s for s in topic_specs(load_settings(customer_merges=True, partitions=6,
                                                          input_retention_ms=5000))}
    assert set(specs) - plain == {MERGES}
    assert specs[MERGES].partitions == 6 and specs[MERGES].config["retention.ms"] == "5000"
    with pytest.raises(ConfigurationError, match="GRADEFLOW_CUSTOMER_MERGES"):
        request_merge(load_settings(), FROM, INTO)
    with pytest.raises(ConfigurationError, match="itself"):
        request_merge(load_settings(customer_merges=True), INTO, INTO)


def test_a_ladder_may_not_name_the_terminal_grade(tmp_path: Any) -> None:
    from pathlib import Path

    from rules.ruleset import RulesetError, load, resolve

    text = Path(resolve("rfm-5")).read_text(encoding="utf-8")
    path = tmp_path / "rules.yaml"
    path.write_text(text.replace("[S, A, B, C, D]", "[S, A, B, C, none]").replace("else: D", "else: none"),
                    encoding="utf-8")
    with pytest.raises(RulesetError, match="'none' is reserved"):
        load(path)


def test_merges_chain_an_id_merged_into_one_merged_later_follows_it() -> None:
    carol_events = [("2026-01-02T10:00:00+08:00", "700.00"), ("2026-02-25T10:00:00+08:00", "20.00")]

    async def run() -> Cluster:
        cluster = Cluster(load_settings(customer_merges=True, partitions=4))
        await cluster.grade([txn(INTO, 1, i, when, amount, f"a{i}") for i, (when, amount) in enumerate(INTO_EVENTS)])
        await cluster.grade([txn(FROM, 2, i, when, amount, f"b{i}") for i, (when, amount) in enumerate(FROM_EVENTS)])
        await cluster.grade([txn("carol", 3, i, when, amount, f"c{i}") for i, (when, amount) in enumerate(carol_events)])
        for merge_id, a, b in [("m-1", FROM, INTO), ("m-2", INTO, "carol")]:
            doc = request(a, b, merge_id=merge_id)
            cluster.broker.topics.setdefault((MERGES, 0), []).append((merge_id.encode(), encode(doc)))
            await cluster.drain()
        await cluster.grade([txn(FROM, 2, len(FROM_EVENTS), LATER[0], LATER[1], "later0")])
        await cluster.drain()
        return cluster

    cluster = asyncio.run(run())
    carol = CustomerState.from_bytes(cluster.table.held[b"carol"][1])
    assert carol.merges == {"m-1": FROM, "m-2": INTO}
    records = [txn("carol", 0, 0, when, amount, f"x{i}") for i, (when, amount) in
               enumerate(INTO_EVENTS + FROM_EVENTS + carol_events + [LATER])]
    records.sort(key=lambda r: orjson.loads(r.value or b"")["occurred_at"])
    store = DictStore()
    for n, record in enumerate(records):
        record.offset = n
        store.save(process_batch([record], RS, store, NOW))
    union = CustomerState.from_bytes(store["carol"])
    assert {k: v for k, v in facts(carol).items() if k != "seen"} == \
        {k: v for k, v in facts(union).items() if k != "seen"}
    assert carol.grades == union.grades
    # alice, merged into carol in turn, ended too.
    assert {c["ladder"]: c["grade"] for c in cluster.changes(INTO)} == \
        {ladder.name: TERMINAL_GRADE for ladder in RS.ladders}


def test_a_new_ruleset_version_never_regrades_a_merged_away_id() -> None:
    from rules.merge import moving
    from streams.rules_start import plan
    from tests.rules.shadowhelp import candidate

    cluster = asyncio.run(scenario(None))
    v2 = candidate()
    items = [(key, raw) for key, (_partition, raw) in cluster.table.held.items()]
    changes, _alerts, states = plan(v2, items)
    assert FROM.encode() not in states and all(key != FROM.encode() for key, _ in changes)
    assert INTO.encode() in states  # the surviving id is re-graded as any customer
    # Nor one frozen on its way (a hand-off cut short by a crash).
    frozen = CustomerState.from_bytes(union_state()[0].to_bytes())
    frozen.merged_into = [INTO, "m-2", 1]
    assert moving(frozen)
    assert plan(v2, [(FROM.encode(), frozen.to_bytes())]) == ([], [], {})
