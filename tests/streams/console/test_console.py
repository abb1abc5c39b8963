"""The console in a real headless Chromium against a real worker, Kafka and Redis.

Screenshots of every page land in .local/screenshots/ (git-ignored).
"""

from __future__ import annotations

import os
import time

import orjson
import pytest

from tests.streams.console.browserhelp import SCREENSHOTS, Browser
from tests.streams.downstream_helpers import delete_prefix, free_port, wait_until
from tests.streams.test_end_to_end import history
from tests.streams.downstream.test_web import get
from tests.streams.producerhelp import produce_librdkafka

REDIS_URL = os.environ.get("GRADEFLOW_REDIS_URL", "redis://127.0.0.1:6379/0")
TOKEN = "console-token-for-tests"


def api(port: int, path: str) -> dict:
    status, body, _ = get(port, path, token=TOKEN)
    assert status == 200, (path, status, body)
    return orjson.loads(body)


@pytest.fixture
def browser():
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def page_counts(b: Browser) -> dict:
    return b.js("Object.fromEntries([...document.querySelectorAll('td.count')].map("
                "e => [e.dataset.ladder + '/' + e.dataset.grade, Number(e.textContent)]))")


def test_console_in_a_browser(worker_factory, bootstrap, browser):
    port = free_port()
    w = worker_factory(GRADEFLOW_API_TOKEN=TOKEN, GRADEFLOW_WEB_PORT=str(port), GRADEFLOW_CLOCK="event",
                       GRADEFLOW_AT_RISK_HORIZON_DAYS="30", GRADEFLOW_CLOCK_TICK_S="0.2")
    prefix = w.env["GRADEFLOW_APP_ID"]
    base = f"http://127.0.0.1:{port}"
    b = browser
    try:
        wait_until(lambda: get(port, "/readyz", token=None)[0] == 200, timeout=60, what="worker ready")
        records = history()
        refund = next(i for i, (_, v) in enumerate(records) if v is not None and b'"a-refund"' in v)
        produce_librdkafka(bootstrap, w.env["GRADEFLOW_TOPIC_TRANSACTIONS"], records[:refund])

        # No token yet: the login prompt. A wrong token: refused, the prompt again, saying so.
        b.goto(f"{base}/console/")
        b.wait_for("!!document.getElementById('login')", what="login prompt")
        b.screenshot(SCREENSHOTS / "login.png")
        b.js("document.getElementById('token').value = 'wrong'; document.querySelector('#login form').requestSubmit()")
        b.wait_for("document.getElementById('login-message')?.textContent.includes('refused')", what="refusal")
        assert b.js("sessionStorage.getItem('gradeflow-token')") is None
        b.js(f"document.getElementById('token').value = '{TOKEN}'; "
             "document.querySelector('#login form').requestSubmit()")
        b.wait_for("document.body.dataset.loaded === 'overview'", what="overview after login")

        # The numbers on the page are the API's (both settle once Redis has every grade).
        def same_counts():
            want = {f"{lad['name']}/{g}": n for lad in api(port, "/api/overview")["ladders"]
                    for g, n in lad["counts"].items()}
            have = page_counts(b)
            return have == want and sum(want.values()) == 3 and have
        wait_until(same_counts, timeout=60, what=f"page counts equal the API's (bob, carol, alice)\n{w.tail()}")
        grades = api(port, "/grades")["ladders"]
        assert page_counts(b) == {f"{ladder}/{g}": n for ladder, counts in grades.items() for g, n in counts.items()}
        overview = api(port, "/api/overview")
        assert b.js("document.getElementById('ruleset').textContent") == \
            f"ruleset {overview['ruleset']['id']}@{overview['ruleset']['version']}"
        day = {(m["from"], m["to"]): m["n"] for m in overview["ladders"][0]["moves"]["day"]}
        assert day and sum(day.values()) >= 5  # initial grades and carol's downgrade at least
        wait_until(lambda: b.js("document.getElementById('moves-day-value')?.dataset.total")
                   == str(sum(m["n"] for m in api(port, "/api/overview")["ladders"][0]["moves"]["day"])),
                   timeout=10, what="the day's from-to matrix")
        dead = api(port, "/api/overview")["dead_letters"]
        assert sum(dead.values()) == 3  # the history's three bad events
        wait_until(lambda: b.js("Object.fromEntries([...document.querySelectorAll('#dead td[data-reason]')]"
                                ".map(e => [e.dataset.reason, Number(e.textContent)]))") == dead,
                   timeout=10, what="dead letters by reason")
        b.screenshot(SCREENSHOTS / "overview.png")

        # The alerts page: carol's downgrade is there; alice's appears within seconds of the refund.
        b.goto(f"{base}/console/#/alerts")
        b.wait_for("[...document.querySelectorAll('#alerts tr.alert a.customer')].some(a => a.textContent === 'carol')",
                   what="carol's downgrade alert")
        assert not b.js("[...document.querySelectorAll('#alerts tr.alert a.customer')]"
                        ".some(a => a.textContent === 'alice')")
        produce_librdkafka(bootstrap, w.env["GRADEFLOW_TOPIC_TRANSACTIONS"], records[refund:refund + 1])
        sent = time.monotonic()
        b.wait_for("[...document.querySelectorAll('#alerts tr.alert[data-kind=downgrade] a.customer')]"
                   ".some(a => a.textContent === 'alice')", timeout=15, what="alice's downgrade alert on the page")
        assert time.monotonic() - sent < 15
        listed = api(port, "/api/alerts?limit=200")["alerts"]
        assert b.js("[...document.querySelectorAll('#alerts tr.alert')].map(r => r.dataset.alertId)") == \
            [a["alert_id"] for a in listed]  # newest first, as the API
        # The severity filter: only that severity's alerts remain.
        b.js("const s = document.getElementById('filter-severity'); s.value = 'critical'; "
             "s.dispatchEvent(new Event('change'))")
        critical = [a["alert_id"] for a in api(port, "/api/alerts?severity=critical")["alerts"]]
        assert critical
        b.wait_for(f"JSON.stringify([...document.querySelectorAll('#alerts tr.alert')].map(r => r.dataset.alertId))"
                   f" === {orjson.dumps(critical).decode()!r}", what="filtered alerts")
        b.screenshot(SCREENSHOTS / "alerts.png")

        b.goto(f"{base}/console/#/at-risk")
        b.wait_for("document.body.dataset.loaded === 'at-risk'", what="at-risk page")
        at_risk = api(port, "/api/at-risk")["customers"]
        assert b.js("document.querySelectorAll('#at-risk tr.at-risk').length") == len(at_risk)
        b.screenshot(SCREENSHOTS / "at-risk.png")

        # Search finds a customer; their page shows the timeline the API keeps, newest first.
        b.js("document.getElementById('search-input').value = 'alice'; "
             "document.getElementById('search').requestSubmit()")
        timeline = wait_until(lambda: (t := api(port, "/api/customers/alice/timeline"))["changes"][0]["cause"]
                              ["event_id"] == "a-refund" and t, timeout=30, what="alice's refund in her timeline")
        b.wait_for("document.body.dataset.loaded === 'customer' && !!document.getElementById('timeline')",
                   what="alice's timeline")
        b.wait_for(f"JSON.stringify([...document.querySelectorAll('#timeline tr.change')].map(r => r.dataset.eventId))"
                   f" === {orjson.dumps([c['event_id'] for c in timeline['changes']]).decode()!r}",
                   what="the timeline rows")
        assert b.js("document.getElementById('customer-id').textContent") == "alice"
        assert b.js("document.querySelector('.grade[data-ladder=value]').textContent") == "A"
        assert [c["cause"]["event_id"] for c in timeline["changes"] if c["cause"]["kind"] == "transaction"][:2] == \
            ["a-refund", "a6"]
        b.screenshot(SCREENSHOTS / "customer.png")

        # A phone's width: the same page, one column, still readable.
        b.viewport(390, 844, mobile=True)
        b.goto(f"{base}/console/#/")
        b.wait_for("document.body.dataset.loaded === 'overview'", what="overview on a phone")
        assert b.js("document.documentElement.scrollWidth <= window.innerWidth + 1")
        b.screenshot(SCREENSHOTS / "overview-phone.png")
    finally:
        delete_prefix(prefix, REDIS_URL)
