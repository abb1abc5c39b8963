"""Reconcile what a cluster published with what the engine computes offline: ``gradeflow audit``.

The pure part, :class:`Audit`, takes the input records (with their partitions and offsets) and
the records of ``grade-changes`` and ``grade-alerts`` in topic order, and checks:

- **chains**: per customer and ladder, in topic order, each change's ``previous_grade`` is the
  grade last published, and ``as_of`` never goes backwards;
- **alerts**: every downgrade out of or within a ladder's key grades has exactly one alert, and
  every alert names such a downgrade (at-risk warnings are checked only for naming a customer);
- **copies**: a change delivered twice (at-least-once) is the same document both times;
- **offline agreement** (event clock or no clock): the same records through the worker's own code
  (:func:`streams.processor.process_batch`), a record at a time in each partition's order, the
  clock caught up to each partition's stream time at the end, give exactly the published
  changes, customer by customer, and so the same final grades. With the event clock the clock's
  changes are placed by record order (streams/clock.py), so this holds whatever the batching,
  the timing of the clock's timer, crashes and rebalances. With the wall clock only the chains,
  copies and alerts are checked: when time passed is not in the records.

The order between the two input topics is the one thing the records do not fix (it is the order
the worker fetched them in), and an interaction's time moves its partition's clock for every
customer there: the offline run merges the two by Kafka timestamp, and on a partition with records
on both topics compares final grades rather than every change. A ruleset with
population-relative grades is not recomputed (its thresholds move with every other customer).

Erased customers (docs/erasure.md): given the erasures (:func:`read_erasures`, from the marker
topic and GRADEFLOW_ERASURE_KEY), the offline run refuses their events up to the erasure as the
workers do, and their published changes and alerts as of the erasure or before are left out of
every check (counted): the compacted topic drops them. A customer's changes after the erasure
are a new customer's, whose chain starts again.

Merged customers (docs/customers.md): given the merges done (:func:`read_merges`, from the merge
topic), an id merged into another must end with the terminal grade on every ladder it had, and the
surviving id's final grades must be those of one customer fed the events of all its ids
(recomputed offline with no clock; with the event clock its final grades are left out, counted).
Their changes are not compared one by one: the merge re-grade has no counterpart offline.
:func:`read_cluster` reads the topics for the command.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from rules.changes import _alert
from rules.engine import CompiledRuleset
from rules.erasure import Erasures
from rules.merge import TERMINAL_GRADE
from rules.schedule import catch_up
from rules.state import CustomerState
from streams.processor import INTERACTIONS, MAX_FUTURE_SKEW_S, TRANSACTIONS, Record, process_batch

SHOWN = 10  # divergences shown per kind
_MERGED = "merged customers differing from the union of their events"


def summary(change: dict[str, Any]) -> tuple:
    """What two copies of a change must agree on: everything but the instant it was emitted."""
    return (change["event_id"], change["ladder"], change["previous_grade"], change["grade"], change["direction"],
            change["cause"]["kind"], change["cause"]["event_id"], change["as_of"],
            orjson.dumps(change.get("metrics"), option=orjson.OPT_SORT_KEYS))


@dataclass
class Report:
    customers: int = 0
    changes: int = 0
    copies: int = 0  # changes delivered more than once, each copy identical
    alerts: int = 0
    expected_changes: int | None = None  # offline; None when not recomputed
    agreeing_customers: int | None = None
    final_grades: int = 0
    agreeing_final: int | None = None
    recomputed: str = ""  # why offline agreement was or was not checked
    both_topics: int = 0  # customers on partitions with records on both input topics: final grades compared
    erased: int = 0  # changes and alerts of erased customers from before their erasure, left out
    merged: int = 0  # customer ids in merges: final grades compared against the union of their events
    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, text: str) -> None:
        self.problems.setdefault(kind, []).append(text)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        def share(n: int | None, of: int) -> str:
            return "not checked" if n is None else f"{n}/{of} ({100.0 * n / of if of else 100.0:.2f}%)"

        lines = [f"customers      {self.customers}",
                 f"changes        {self.changes} published ({self.copies} delivered more than once, identical)",
                 f"alerts         {self.alerts}",
                 f"offline        {self.recomputed}"]
        if self.expected_changes is not None:
            lines.append(f"               {self.expected_changes} changes computed offline")
        if self.both_topics:
            lines.append(f"               {self.both_topics} customers on partitions with records on both "
                         f"input topics: their final grades compared")
        if self.erased:
            lines.append(f"erased         {self.erased} changes and alerts of erased customers, as of their erasure "
                         f"or before: left out")
        if self.merged:
            lines.append(f"merged         {self.merged} customer ids in merges: final grades compared with one "
                         f"customer fed the events of all its ids")
        lines += [f"customers agreeing      {share(self.agreeing_customers, self.customers)}",
                  f"final grades agreeing   {share(self.agreeing_final, self.final_grades)}"]
        for kind, texts in sorted(self.problems.items()):
            lines.append(f"{kind}: {len(texts)}")
            lines += [f"  {t}" for t in texts[:SHOWN]]
        lines.append("OK: every check agrees" if self.ok else "FAILED: see above")
        return "\n".join(lines)


def _as_of(change: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(change["as_of"])


class Audit:
    """Check published changes and alerts against each other and against an offline run."""

    def __init__(self, rs: CompiledRuleset, clock: str = "off", allowed_lateness_days: float | None = None,
                 max_future_skew_s: float | None = MAX_FUTURE_SKEW_S, erasures: Erasures | None = None,
                 merges: dict[str, str] | None = None) -> None:
        self.rs, self.clock = rs, clock
        self.merges = merges or {}  # merged-away id → the id it was merged into
        self.erasures = erasures
        self.allowed_lateness_days = allowed_lateness_days
        self.max_future_skew_s = max_future_skew_s
        self.ladders = {ladder.name: ladder for ladder in rs.ladders}

    # ------------------------------------------------------------ offline

    def offline(self, records: Iterable[Record], progress: Callable[[int], None] | None = None
                ) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
        """The changes (per customer, in order) and alerts the worker's code makes of ``records``."""
        rs = self.rs
        by_partition: dict[int, list[Record]] = {}
        for r in records:
            by_partition.setdefault(r.partition, []).append(r)
        store: dict[str, bytes] = {}
        where: dict[str, int] = {}
        changes: dict[str, list[dict[str, Any]]] = {}
        alerts: list[dict[str, Any]] = []
        now = datetime.now(timezone.utc)
        clocked = self.clock != "off"
        horizon = timedelta(0) if clocked else None
        streams: dict[int, float] = {}
        done = 0
        for partition, held in sorted(by_partition.items()):
            # Each topic in its own order; the two merged by timestamp.
            ordered = heapq.merge(sorted((r for r in held if r.role == TRANSACTIONS), key=lambda r: r.offset),
                                  sorted((r for r in held if r.role != TRANSACTIONS), key=lambda r: r.offset),
                                  key=lambda r: r.timestamp_ms or 0)
            for r in ordered:
                result = process_batch([r], rs, store, now, population=None,
                                       allowed_lateness_days=self.allowed_lateness_days,
                                       max_future_skew_s=self.max_future_skew_s, clock_horizon=horizon,
                                       stream_time=streams if self.clock == "event" else None,
                                       erased=self.erasures)
                if self.clock == "event":
                    streams = result.stream_time
                for customer_id, (raw, _record) in result.states.items():
                    store[customer_id] = raw
                    where[customer_id] = partition
                for _key, doc in result.grade_changes:
                    change = orjson.loads(doc)
                    changes.setdefault(change["customer_id"], []).append(change)
                alerts += [orjson.loads(doc) for _key, doc in result.alerts]
                done += 1
                if progress is not None and done % 1000 == 0:
                    progress(1000)
        if self.clock == "event":  # the clock catches every customer up to their partition's time
            for customer_id, raw in store.items():
                upto = streams.get(where[customer_id])
                if upto is None:
                    continue
                state = CustomerState.from_bytes(raw)
                out, warn = catch_up(customer_id, rs, state, upto, now)
                if out:
                    changes.setdefault(customer_id, []).extend(out)
                alerts += warn
        if progress is not None:
            progress(done % 1000)
        return changes, alerts

    # ------------------------------------------------------------ the checks

    def check(self, inputs: list[Record], published: Iterable[bytes], alerts: Iterable[bytes] | None,
              progress: Callable[[int], None] | None = None, offline: bool = True) -> Report:
        """Every check; ``alerts`` None: not checked; ``offline`` False: no recomputation (chains,
        copies and alerts only)."""
        report = Report()
        online: dict[str, list[dict[str, Any]]] = {}
        seen: dict[str, tuple] = {}
        for value in published:
            change = orjson.loads(value)
            if self._erased(change):
                report.erased += 1
                continue
            s = summary(change)
            first = seen.get(change["event_id"])
            if first is not None:
                report.copies += 1
                if first != s:
                    report.add("copies that differ", f"{change['event_id']}: {first} then {s}")
                continue
            seen[change["event_id"]] = s
            online.setdefault(change["customer_id"], []).append(change)
        report.customers = len(online)
        report.changes = len(seen)
        downgrades = self._check_chains(online, report)
        if alerts is not None:
            self._check_alerts(alerts, downgrades, report)
        if not offline:
            report.recomputed = "not recomputed (asked not to)"
        elif self.clock == "wall":
            report.recomputed = "not recomputed: the wall clock's changes depend on when the worker ran"
        elif self.rs.quantiles:
            report.recomputed = "not recomputed: the ruleset grades against the population"
        else:
            self._check_offline(inputs, online, report, progress)
        return report

    def _erased(self, doc: dict[str, Any]) -> bool:
        """Whether ``doc`` (a change or an alert) is of an erased customer, as of the erasure or before."""
        if self.erasures is None or not self.erasures:
            return False
        at = self.erasures.erased_at(str(doc.get("customer_id")))
        return at is not None and _as_of(doc).timestamp() <= at

    def _check_chains(self, online: dict[str, list[dict[str, Any]]], report: Report) -> dict[str, dict[str, Any]]:
        """Chains per customer and ladder; returns the published changes that call for an alert."""
        want_alert: dict[str, dict[str, Any]] = {}
        for customer, changes in online.items():
            last: dict[str, tuple[str | None, datetime | None]] = {}
            for change in changes:
                ladder = change["ladder"]
                grade, as_of = last.get(ladder, (None, None))
                moment = _as_of(change)
                if change["previous_grade"] != grade:
                    report.add("broken chains", f"{customer}/{ladder}: {change['previous_grade']} -> {change['grade']} "
                                                f"as of {change['as_of']} ({change['cause']['kind']}) after "
                                                f"{grade} was published")
                if as_of is not None and moment < as_of:
                    report.add("as_of going backwards", f"{customer}/{ladder}: {change['as_of']} after "
                                                        f"{as_of.isoformat()}")
                last[ladder] = (change["grade"], moment if as_of is None or moment > as_of else as_of)
                compiled = self.ladders.get(ladder)
                if compiled is not None and _alert(customer, compiled, change, moment) is not None:
                    want_alert[change["event_id"]] = change
            report.final_grades += len(last)
        return want_alert

    def _check_alerts(self, alerts: Iterable[bytes], want: dict[str, dict[str, Any]], report: Report) -> None:
        got: dict[str, set[str]] = {}
        for value in alerts:
            alert = orjson.loads(value)
            if self._erased(alert):
                report.erased += 1
                continue
            if alert.get("kind") == "at_risk":
                continue
            report.alerts += 1
            got.setdefault(alert["grade_change_event_id"], set()).add(alert["alert_id"])
        for event_id, ids in got.items():
            if event_id not in want:
                report.add("alerts naming no key downgrade", f"alert {sorted(ids)[0]} names change {event_id}")
            elif len(ids) > 1:
                report.add("downgrades with several alerts", f"change {event_id}: alerts {sorted(ids)}")
        for event_id, change in want.items():
            if event_id not in got:
                report.add("key downgrades without an alert",
                           f"{change['customer_id']}/{change['ladder']}: {change['previous_grade']} -> "
                           f"{change['grade']} as of {change['as_of']} ({event_id})")

    def _check_offline(self, inputs: list[Record], online: dict[str, list[dict[str, Any]]], report: Report,
                       progress: Callable[[int], None] | None) -> None:
        expected, _alerts = self.offline(inputs, progress)
        report.recomputed = f"recomputed with the {self.clock} clock" if self.clock != "off" else "recomputed"
        report.expected_changes = sum(len(c) for c in expected.values())
        # A partition with records on both input topics: the order between the two topics is the
        # worker's fetch order, which the records do not fix, and an interaction's time moves the
        # partition's clock for every customer on it. There, final grades are compared, not every
        # change (chains, copies and alerts are checked everywhere).
        partition_roles: dict[int, set[str]] = {}
        home: dict[str, int] = {}
        for r in inputs:
            partition_roles.setdefault(r.partition, set()).add(r.role)
            if r.key is not None:
                home[r.key.decode("utf-8", "replace")] = r.partition
        merged = self.merges.keys() | set(self.merges.values())
        report.final_grades = 0
        report.agreeing_final = 0
        if merged:
            self._check_merged(inputs, online, report)
        expected = {c: v for c, v in expected.items() if c not in merged}
        online = {c: v for c, v in online.items() if c not in merged}
        mixed = {p for p, kinds in partition_roles.items() if len(kinds) > 1}
        both = {customer for customer, p in home.items() if p in mixed}
        report.both_topics = len(both)
        agreeing = 0
        final_agree = 0
        final_total = 0
        for customer in sorted(set(expected) | set(online)):
            want = [summary(c) for c in expected.get(customer, [])]
            got = [summary(c) for c in online.get(customer, [])]
            finals_want = {s[1]: s[3] for s in want}
            finals_got = {s[1]: s[3] for s in got}
            ladders = finals_want.keys() | finals_got.keys()
            final_total += len(ladders)
            final_agree += sum(1 for k in ladders if finals_want.get(k) == finals_got.get(k))
            if want == got or (customer in both and finals_want == finals_got):
                agreeing += 1
            elif customer in both:
                report.add("final grades differing from offline",
                           f"{customer}: offline {finals_want}, published {finals_got}")
            else:
                at = next((i for i, (w, g) in enumerate(zip(want, got)) if w != g), min(len(want), len(got)))
                report.add("customers differing from offline",
                           f"{customer}: from change {at}: offline {_brief(want[at:at + 2])}, "
                           f"published {_brief(got[at:at + 2])}")
        report.customers = len(set(expected) | set(online)) + report.merged
        report.agreeing_customers = agreeing + report.merged - sum(1 for t in report.problems.get(_MERGED, ()))
        report.final_grades += final_total
        report.agreeing_final = final_agree + (report.agreeing_final or 0)

    def root(self, customer_id: str) -> str:
        """The id ``customer_id`` lives on as, after every merge."""
        seen = {customer_id}
        while customer_id in self.merges:
            customer_id = self.merges[customer_id]
            if customer_id in seen:
                break
            seen.add(customer_id)
        return customer_id

    def _check_merged(self, inputs: list[Record], online: dict[str, list[dict[str, Any]]], report: Report) -> None:
        """Merged-away ids ended; each surviving id's final grades those of the union of its ids' events."""
        groups: dict[str, list[Record]] = {}
        for r in inputs:
            customer = r.key.decode("utf-8", "replace") if r.key is not None else None
            if customer is not None and (customer in self.merges or customer in self.merges.values()):
                groups.setdefault(self.root(customer), []).append(r)
        report.merged = len(self.merges.keys() | set(self.merges.values()))
        report.agreeing_final = report.agreeing_final or 0
        for customer in sorted(self.merges):
            finals = {c["ladder"]: c["grade"] for c in online.get(customer, [])}
            report.final_grades += len(finals)
            ended = {ladder for ladder, grade in finals.items() if grade == TERMINAL_GRADE}
            report.agreeing_final += len(ended)
            if len(ended) != len(finals):
                report.add(_MERGED, f"{customer} (merged into {self.merges[customer]}) did not end: {finals}")
        if self.clock != "off":
            return  # the clock's changes of the union depend on partitions the ids did not share
        now = datetime.now(timezone.utc)
        for root, records in sorted(groups.items()):
            store: dict[str, bytes] = {}
            ordered = sorted(records, key=lambda r: (r.timestamp_ms or 0, r.partition, r.offset))
            for n, r in enumerate(ordered):
                doc = orjson.loads(r.value or b"null")
                if isinstance(doc, dict) and "customer_id" in doc:
                    doc["customer_id"] = root
                union = Record(r.role, r.topic, 0, n, root.encode(), orjson.dumps(doc), r.timestamp_ms)
                result = process_batch([union], self.rs, store, now, allowed_lateness_days=self.allowed_lateness_days,
                                       max_future_skew_s=self.max_future_skew_s, erased=self.erasures)
                for customer_id, (raw, _record) in result.states.items():
                    store[customer_id] = raw
            want = CustomerState.from_bytes(store[root]).grades if root in store else {}
            got = {c["ladder"]: c["grade"] for c in online.get(root, [])}
            ladders = want.keys() | got.keys()
            report.final_grades += len(ladders)
            report.agreeing_final += sum(1 for k in ladders if want.get(k) == got.get(k))
            if want != got:
                report.add(_MERGED, f"{root} (with {', '.join(sorted(c for c in self.merges if self.root(c) == root))}):"
                                    f" the union of their events {want}, published {got}")


def _brief(summaries: list[tuple]) -> str:
    if not summaries:
        return "nothing"
    return "; ".join(f"{s[1]} {s[2]}->{s[3]} as of {s[7]} ({s[5]})" for s in summaries)


# ---------------------------------------------------------------- reading a cluster


def read_cluster(settings: Any, progress: Callable[[int], None] | None = None
                 ) -> tuple[list[Record], list[bytes], list[bytes]]:
    """Every record of the input topics (with partition and offset), and the values of
    ``grade-changes`` and ``grade-alerts`` in topic order, read from the beginning to their ends
    as of now."""
    from kafka import KafkaConsumer, TopicPartition

    from schemas.errors import ServerUnavailable
    from streams.readback import read_to_end
    from streams.kafka_config import kafka_python_options

    names = settings.topics
    roles = {names.transactions: TRANSACTIONS, names.interactions: INTERACTIONS}
    try:
        # read_committed: with exactly_once, what an aborted transaction wrote was never published.
        consumer = KafkaConsumer(**kafka_python_options(settings), group_id=None, enable_auto_commit=False,
                                 isolation_level="read_committed",
                                 receive_message_max_bytes=64 * 1024 * 1024, fetch_max_bytes=16 * 1024 * 1024)
    except Exception as exc:  # kafka-python's NoBrokersAvailable and friends
        raise ServerUnavailable(f"Kafka at {settings.kafka_bootstrap} is not reachable ({exc}); start it "
                                f"(deploy/local/up for a local one) or set GRADEFLOW_KAFKA_BOOTSTRAP") from exc
    inputs: list[Record] = []
    changes: list[tuple[int, int, bytes]] = []
    alerts: list[tuple[int, int, bytes]] = []
    try:
        tps = []
        for topic in (names.transactions, names.interactions, names.grade_changes, names.alerts):
            for p in sorted(consumer.partitions_for_topic(topic) or ()):
                tps.append(TopicPartition(topic, p))
        for tp, records in read_to_end(consumer, tps, max_records=10000):
            for r in records:
                if tp.topic in roles:
                    inputs.append(Record(roles[tp.topic], tp.topic, tp.partition, r.offset, r.key, r.value,
                                         r.timestamp))
                elif tp.topic == names.grade_changes and r.value is not None:
                    changes.append((tp.partition, r.offset, r.value))
                elif r.value is not None:
                    alerts.append((tp.partition, r.offset, r.value))
            if progress is not None:
                progress(len(records))
    finally:
        consumer.close()
    # A customer's outputs all sit on one partition (keyed by customer): partition order is topic order.
    changes.sort(key=lambda c: (c[0], c[1]))
    alerts.sort(key=lambda a: (a[0], a[1]))
    return inputs, [v for _, _, v in changes], [v for _, _, v in alerts]


def read_erasures(settings: Any) -> Erasures | None:
    """The erasures on the marker topic (None when GRADEFLOW_ERASURE_KEY is unset or the topic is missing)."""
    from kafka import KafkaConsumer, TopicPartition

    from rules.erasure import decode_instant
    from streams.kafka_config import kafka_python_options
    from streams.readback import read_to_end
    from streams.settings import erasure_topics

    if settings.erasure_key is None:
        return None
    topic = erasure_topics(settings).markers
    erasures = Erasures(settings.erasure_key.get_secret_value().encode())
    consumer = KafkaConsumer(**kafka_python_options(settings), group_id=None, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return None
        for _tp, records in read_to_end(consumer, [TopicPartition(topic, p) for p in sorted(parts)]):
            for r in records:
                if r.key is not None and r.value is not None:
                    erasures.add(r.key, decode_instant(r.value))
    finally:
        consumer.close()
    return erasures


def read_merges(settings: Any) -> dict[str, str]:
    """The merges done, from the merge topic's outcomes: merged-away id → the id it was merged into
    (empty when merges are off or the topic is missing)."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.kafka_config import kafka_python_options
    from streams.readback import read_to_end
    from streams.settings import merges_topic

    if not settings.customer_merges:
        return {}
    topic = merges_topic(settings)
    merges: dict[str, str] = {}
    consumer = KafkaConsumer(**kafka_python_options(settings), group_id=None, enable_auto_commit=False)
    try:
        if not consumer.partitions_for_topic(topic):
            return {}
        for _tp, records in read_to_end(consumer, [TopicPartition(topic, 0)]):
            for r in records:
                try:
                    doc = orjson.loads(r.value or b"")
                except orjson.JSONDecodeError:
                    continue
                if isinstance(doc, dict) and doc.get("step") == "done":
                    merges[str(doc["from"])] = str(doc["into"])
    finally:
        consumer.close()
    return merges
