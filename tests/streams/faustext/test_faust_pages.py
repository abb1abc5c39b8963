"""Faust's built-in pages (/router, /table, /graph, statistics) are not served: they know nothing of
the API token and show the cluster's layout and any customer's state."""

from __future__ import annotations

import urllib.error
import urllib.request

from tests.streams.downstream_helpers import wait_until
from rules.engine import compile_ruleset
from rules.ruleset import load
from streams.app import create_app
from streams.faustext.faust_pages import BUILTIN_PAGE_SETTINGS
from streams.tools.local import free_port, produce
from streams.settings import load_settings
from tests.streams.faustext.test_standby import purchase

FAUST_PAGES = ["/router/", "/router/customer-state/get/?key=c1", "/table/", "/table/customer-state/",
               "/table/customer-state/c1/", "/graph/", "/assignment/", "/performance/"]


def test_the_app_enables_none_of_fausts_own_pages(tmp_path):
    app = create_app(load_settings(data_dir=tmp_path), compile_ruleset(load("rfm-5")))
    for name in BUILTIN_PAGE_SETTINGS:
        assert getattr(app.conf, name) is False, name
    assert [bp for _prefix, bp in app.web.blueprints._enabled] == ["faust.web.apps.production_index:blueprint"]


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_worker_answers_404_for_fausts_pages_with_or_without_the_token(worker_factory, bootstrap):
    token = "s3cr3t-token-pages"
    worker = worker_factory(GRADEFLOW_API_TOKEN=token, GRADEFLOW_WEB_PORT=str(free_port()))
    produce(bootstrap, worker.env["GRADEFLOW_TOPIC_TRANSACTIONS"], [purchase("c1", "e1", 2, "100")])
    base = f"http://127.0.0.1:{worker.env['GRADEFLOW_WEB_PORT']}"
    # The worker holds c1's state and serves it to a caller with the token ...
    status, body = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(get(base + "/customers/c1", token)),
                              timeout=60, what="c1 graded and served")
    assert b'"source":"table"' in body.replace(b" ", b""), body
    # ... and nowhere else.
    for path in FAUST_PAGES:
        for with_token in (None, token):
            status, body = get(base + path, with_token)
            assert status == 404, (path, with_token is not None, status, body[:300])
            assert b"c1" not in body and b"customer-state" not in body, (path, body[:300])
    assert get(base + "/metrics")[0] == 401
