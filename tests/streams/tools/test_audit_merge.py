"""``gradeflow audit`` with merged customers (streams/tools/audit.py): the merged-away id must have
ended, the surviving id's final grades must be the union's; without the merges it would see
divergences."""

from __future__ import annotations

import asyncio

import orjson

from streams.tools.audit import Audit
from tests.streams.test_merging import FROM, FROM_EVENTS, INTO, INTO_EVENTS, LATER, Cluster, scenario, txn
from tests.streams.test_processor import RS


def published(cluster: Cluster) -> list[bytes]:
    return [v for (topic, _p), records in sorted(cluster.broker.topics.items()) if topic == "grade-changes"
            for _k, v in records]


def inputs() -> list:
    records = [txn(INTO, 1, i, when, amount, f"a{i}") for i, (when, amount) in enumerate(INTO_EVENTS)]
    records += [txn(FROM, 2, i, when, amount, f"b{i}") for i, (when, amount) in enumerate(FROM_EVENTS)]
    return records + [txn(FROM, 2, len(FROM_EVENTS), LATER[0], LATER[1], "later0")]


def test_the_audit_compares_a_merged_customer_with_the_union_of_its_ids_events() -> None:
    cluster = asyncio.run(scenario(None))
    report = Audit(RS, clock="off", merges={FROM: INTO}).check(inputs(), published(cluster), None)
    assert report.ok, report.render()
    assert report.merged == 2 and "merged" in report.render()
    assert report.agreeing_final == report.final_grades > 0

    # Without the merges, both ids diverge from an offline run that kept them apart.
    blind = Audit(RS, clock="off").check(inputs(), published(cluster), None)
    assert not blind.ok


def test_the_audit_reports_a_merged_away_id_that_did_not_end() -> None:
    cluster = asyncio.run(scenario(None))
    changes = published(cluster)
    # Drop FROM's terminal changes: its last grades are then real ones.
    kept = [v for v in changes if not (orjson.loads(v)["customer_id"] == FROM
                                       and orjson.loads(v)["direction"] == "ended")]
    report = Audit(RS, clock="off", merges={FROM: INTO}).check(inputs(), kept, None)
    assert not report.ok
    assert any(f"{FROM} (merged into {INTO}) did not end" in t for t in
               report.problems["merged customers differing from the union of their events"])
