"""``gradeflow audit`` (streams/tools/audit.py) with erased customers: their outputs from before the
erasure are left out, their old events refused offline, and a new customer after the erasure checks out."""

from __future__ import annotations

from datetime import datetime

from rules.erasure import Erasures
from streams.processor import process_batch
from streams.tools.audit import Audit
from tests.streams.test_processor import NOW, RS, DictStore, Feed

ERASED_AT = datetime.fromisoformat("2026-03-01T00:00:00+08:00").timestamp()


def published_around_an_erasure() -> tuple[Feed, list[bytes], list[bytes], Erasures]:
    """What the workers publish: alice and bob graded, alice erased (state gone), then a later event of
    alice (a new customer) and a replay of her old one (refused)."""
    feed = Feed()
    before = [feed.txn("alice", "2026-01-10T10:00:00+08:00", "30000.00"),
              feed.txn("bob", "2026-01-11T10:00:00+08:00", "9000.00")]
    store = DictStore()
    first = process_batch(before, RS, store, NOW)
    store.save(first)
    del store["alice"]  # the erasure's tombstone
    erasures = Erasures(b"e" * 32)
    erasures.erase("alice", ERASED_AT)
    after = [feed.txn("alice", "2026-01-10T10:00:00+08:00", "30000.00", event_id="t0"),  # replayed: refused
             feed.txn("alice", "2026-03-05T10:00:00+08:00", "80.00")]
    second = process_batch(after, RS, store, NOW, erased=erasures)
    assert second.refused == 1 and second.applied == 1
    published = [v for _k, v in first.grade_changes + second.grade_changes]
    alerts = [v for _k, v in first.alerts + second.alerts]
    return feed, published, alerts, erasures


def test_the_audit_agrees_with_workers_that_erased_a_customer() -> None:
    feed, published, alerts, erasures = published_around_an_erasure()
    report = Audit(RS, erasures=erasures).check(feed.records, published, alerts)
    assert report.ok, report.render()
    assert report.erased >= 1 and "erased" in report.render()
    assert report.agreeing_customers == report.customers == 2


def test_without_the_erasures_the_audit_sees_a_broken_chain_and_a_divergence() -> None:
    feed, published, alerts, _erasures = published_around_an_erasure()
    report = Audit(RS).check(feed.records, published, alerts)
    assert not report.ok
    assert "broken chains" in report.problems  # alice's new first grade after her old one
