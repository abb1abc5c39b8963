"""The worker's HTTP API on Faust's web server (bound to GRADEFLOW_WEB_HOST:GRADEFLOW_WEB_PORT).

``GET /customers/{customer_id}``  current grades and metrics; from this worker's table when
                                  it holds the customer's state (``partition`` says where),
                                  else from Redis (``partition`` null)
``GET /customers/{customer_id}/history``
                                  the customer's grade changes per ladder, bounded (Redis;
                                  ``ladder``, ``since``, ``until``, ``limit``)
``GET /grades``                   customers per grade, per ladder (Redis)
``GET /rules/diff``               the blast radius of promoting a shadow ruleset (streams/shadow_diff.py)
``GET /healthz``                  the process answers (no token)
``GET /readyz``                   partitions assigned and table recovery done (no token)
``GET /rules``                    the active ruleset, the control record that made it active and
                                  this worker's re-grade progress (docs/rules-lifecycle.md)
``GET /metrics``                  Prometheus text format
``GET /openapi.json``             this API, described (OpenAPI 3.1)
``GET /console/``, ``/api/...``    the console and its JSON (streams/console)

When ``GRADEFLOW_API_TOKEN`` is set every route but /healthz and /readyz needs
``Authorization: Bearer <token>`` (compared in constant time), else 401.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Any

from faust.types import TP
from faust.web import Request, Response, View

from rules.engine import CompiledRuleset, evaluate
from rules.state import CustomerState
from schemas.api import CustomerGrades, CustomerHistory, Error, GradeCounts, Health
from schemas.money import format_minor
from streams import __version__, console
from streams.downstream import history
from streams import shadow_diff
from streams.faustext.tables import FaustStateStore

OPEN_PATHS = ("/healthz", "/readyz")


def authorized(header: str | None, token: str) -> bool:
    """True if ``header`` is ``Bearer <token>`` (constant-time comparison)."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def is_ready(app: Any) -> tuple[bool, dict[str, Any]]:
    """Ready once the consumer has its assignment and the tables are recovered."""
    recovery = app.tables.recovery
    detail = {
        "recovery_completed": recovery.completed.is_set(),
        "in_recovery": bool(getattr(app, "in_recovery", False)),
        "rebalancing": bool(getattr(app, "rebalancing", False)),
    }
    try:
        detail["assigned_partitions"] = len(app.consumer.assignment())
    except Exception:  # noqa: BLE001 - consumer not started
        detail["assigned_partitions"] = None
    ok = detail["recovery_completed"] and not detail["in_recovery"] and not detail["rebalancing"] \
        and detail["assigned_partitions"] is not None
    rules = getattr(app, "gradeflow_rules", None)
    if rules is not None:
        # Informative only: a worker re-grading after a promotion grades and answers as usual
        # (docs/rules-lifecycle.md), so it stays in service.
        detail["rules_regrade_complete"] = rules.status()["regrade_complete"]
    return ok, detail


def table_grades(raw: bytes, rs: CompiledRuleset) -> dict[str, Any]:
    """Grades by ladder from a table value: the grade last emitted, metrics as of the latest event."""
    state = CustomerState.from_bytes(raw)
    as_of = datetime.fromtimestamp(state.last_event_ts, rs.tz) if state.last_event_ts is not None else None
    ev = evaluate(rs, state, as_of) if as_of is not None else None
    out: dict[str, Any] = {}
    for ladder, grade in state.grades.items():
        metrics = _metrics(rs, ev, ladder) if ev is not None else None
        out[ladder] = {"grade": grade, "as_of": as_of.isoformat() if as_of else None, "metrics": metrics,
                       "event_id": None, "ruleset": {"id": rs.id, "version": rs.version}}
    return out


def _metrics(rs: CompiledRuleset, ev: Any, ladder_name: str) -> dict[str, Any] | None:
    """The ``metrics`` object of a grade change (schemas.events.Metrics), from an evaluation."""
    try:
        metrics: dict[str, Any] = {
            "recency_days": ev.recency_days, "frequency": ev.frequency,
            "monetary": format_minor(ev.monetary_minor, rs.currency),
            "r": ev.scores.get("r", 0), "f": ev.scores.get("f", 0), "m": ev.scores.get("m", 0), "code": ev.code,
        }
        values = getattr(ev, "values", None)
        ladder = next((lad for lad in rs.ladders if lad.name == ladder_name), None)
        if values is not None and ladder is not None and hasattr(ladder, "metrics"):
            from rules.changes import json_value

            metrics["values"] = {n: json_value(rs, n, values.get(n)) for n in ladder.metrics}
        return metrics
    except (AttributeError, ImportError, KeyError, TypeError):
        return None


def openapi(settings: Any) -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API."""
    schemas: dict[str, Any] = {}
    for model in (CustomerGrades, CustomerHistory, GradeCounts, Health, Error):
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(doc.pop("$defs", {}))
        schemas[model.__name__] = doc

    def ok(name: str, text: str) -> dict[str, Any]:
        return {"description": text, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}

    unauthorized = ok("Error", "Missing or wrong bearer token (only when GRADEFLOW_API_TOKEN is set).")
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "gradeflow worker API", "version": __version__,
                 "description": "Current customer grades, grade counts, health and metrics of a gradeflow worker."},
        "servers": [{"url": f"http://{settings.web_host}:{settings.web_port}"}],
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/customers/{customer_id}": {"get": {
                "summary": "Current grades and metrics of one customer",
                "parameters": [{"name": "customer_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "security": secured,
                "responses": {"200": ok("CustomerGrades", "Grades by ladder, and where they were read."),
                              "401": unauthorized, "404": ok("Error", "No grade known for this customer."),
                              "503": ok("Error", "Redis is unreachable (customer not local).")}}},
            "/customers/{customer_id}/history": {"get": {
                "summary": "The customer's grade changes per ladder, oldest first, with ruleset version, cause, "
                           "metrics and reasons (bounded: GRADEFLOW_HISTORY_MAX_CHANGES, GRADEFLOW_HISTORY_MAX_AGE_DAYS)",
                "parameters": [
                    {"name": "customer_id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "ladder", "in": "query", "schema": {"type": "string"}, "description": "Only this ladder."},
                    {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"},
                     "description": "Changes with as_of at or after this instant (RFC 3339 with an offset)."},
                    {"name": "until", "in": "query", "schema": {"type": "string", "format": "date-time"},
                     "description": "Changes with as_of at or before this instant (RFC 3339 with an offset)."},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": history.MAX_LIMIT},
                     "description": "At most this many per ladder: the latest of the window."}],
                "security": secured,
                "responses": {"200": ok("CustomerHistory", "Changes by ladder."),
                              "400": ok("Error", "A bad parameter."), "401": unauthorized,
                              "404": ok("Error", "No grade change known for this customer."),
                              "503": ok("Error", "Redis is unreachable.")}}},
            "/grades": {"get": {"summary": "Customers per grade, per ladder", "security": secured,
                                "responses": {"200": ok("GradeCounts", "Counts from Redis."), "401": unauthorized,
                                              "503": ok("Error", "Redis is unreachable.")}}},
            "/healthz": {"get": {"summary": "Liveness", "security": [],
                                 "responses": {"200": ok("Health", "The worker answers.")}}},
            "/readyz": {"get": {"summary": "Readiness", "security": [],
                                "responses": {"200": ok("Health", "Partitions assigned, recovery done."),
                                              "503": ok("Health", "Not ready yet.")}}},
            "/rules": {"get": {"summary": "The active ruleset (id, version, the rules-control record that made it "
                                         "active, the previous one) and this worker's re-grade: customers done of "
                                         "the total, ETA, regrade_complete", "security": secured,
                               "responses": {"200": {"description": "The worker's rules status.",
                                                     "content": {"application/json": {}}},
                                             "401": unauthorized}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": secured,
                                 "responses": {"200": {"description": "Prometheus text format 0.0.4",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               "401": unauthorized}}},
            "/openapi.json": {"get": {"summary": "This description", "security": secured,
                                      "responses": {"200": {"description": "OpenAPI 3.1",
                                                            "content": {"application/json": {}}},
                                                    "401": unauthorized}}},
        },
    }


def register(app: Any, settings: Any, table: Any, ruleset: CompiledRuleset, downstream: Any) -> None:
    """Add the API's pages to ``app``. ``downstream`` gives ``grades()`` (AsyncGrades) and ``metrics``."""
    # The plain token only here, where it is compared; the settings show it masked everywhere else.
    token = settings.api_token.get_secret_value() if settings.api_token else None
    def active() -> CompiledRuleset:
        # The ruleset a promotion made active (streams/rules_control.py), else the one started with.
        rules = getattr(app, "gradeflow_rules", None)
        return rules.active if rules is not None else ruleset

    spec = openapi(settings)
    spec["paths"].update(console.api_paths())
    spec["paths"].update(shadow_diff.api_paths())
    states = FaustStateStore(table)

    class Guarded(View):
        async def dispatch(self, request: Any) -> Any:
            if token and not authorized(request.headers.get("Authorization"), token):
                return self.json({"error": "unauthorized: send Authorization: Bearer <GRADEFLOW_API_TOKEN>"},
                                 status=401, headers={"WWW-Authenticate": 'Bearer realm="gradeflow"'})
            return await super().dispatch(request)

    @app.page("/healthz", name="gradeflow-healthz")
    async def healthz(self: View, request: Request) -> Response:
        return self.json({"status": "ok", "detail": {}})

    @app.page("/readyz", name="gradeflow-readyz")
    async def readyz(self: View, request: Request) -> Response:
        ok, detail = is_ready(app)
        return self.json({"status": "ready" if ok else "not_ready", "detail": detail}, status=200 if ok else 503)

    @app.page("/customers/{customer_id}", base=Guarded, name="gradeflow-customer")
    async def customer(self: View, request: Request, customer_id: str) -> Response:
        key = customer_id.encode()
        ready, _ = is_ready(app)
        # Where the state lives here, not a hash of the id: producers partition as they like.
        partition = states.partition_of(key) if ready else None
        local = partition is not None and TP(settings.topics.transactions, partition) in app.consumer.assignment()
        if local:
            raw = table.get(key)
            if raw is None:
                return self.json({"error": f"no grade known for customer {customer_id!r}"}, status=404)
            grades = table_grades(raw, active())
            source = "table"
        else:
            try:
                grades = await downstream.grades().customer(customer_id, [lad.name for lad in active().ladders])
            except Exception as exc:  # noqa: BLE001 - Redis down: say so
                return self.json({"error": f"redis unavailable: {exc}"}, status=503)
            if not grades:
                return self.json({"error": f"no grade known for customer {customer_id!r}"}, status=404)
            source = "redis"
        return self.json({"customer_id": customer_id, "source": source, "partition": partition, "grades": grades})

    bounds = history.Bounds.of(settings)

    @app.page("/customers/{customer_id}/history", base=Guarded, name="gradeflow-customer-history")
    async def customer_history(self: View, request: Request, customer_id: str) -> Response:
        try:
            query = history.Query.parse(request.query)
        except ValueError as exc:
            return self.json({"error": str(exc)}, status=400)
        reader = downstream.history()
        try:
            known = await reader.ladders(customer_id)
            wanted = [query.ladder] if query.ladder else known
            found = await reader.read(customer_id, [lad for lad in wanted if lad in known],
                                      query.since_us, query.until_us, query.limit)
        except Exception as exc:  # noqa: BLE001 - Redis down: say so
            return self.json({"error": f"redis unavailable: {type(exc).__name__}"}, status=503)
        if not known:
            return self.json({"error": f"no grade change known for customer {customer_id!r}"}, status=404)
        return self.json(history.body(customer_id, found, bounds))

    @app.page("/grades", base=Guarded, name="gradeflow-grades")
    async def grades(self: View, request: Request) -> Response:
        rs = active()
        try:
            counts = await downstream.grades().counts([lad.name for lad in rs.ladders])
        except Exception as exc:  # noqa: BLE001
            return self.json({"error": f"redis unavailable: {exc}"}, status=503)
        out = {}
        for lad in rs.ladders:
            known = counts.pop(lad.name, {})
            out[lad.name] = {g: int(known.get(g, 0)) for g in lad.grades}
        out.update(counts)  # ladders Redis knows that this ruleset no longer has
        return self.json({"source": "redis", "ladders": out})

    @app.page("/metrics", base=Guarded, name="gradeflow-metrics")
    async def metrics(self: View, request: Request) -> Response:
        m = downstream.metrics
        try:
            m.set_grade_counts(await downstream.grades().counts([lad.name for lad in active().ladders]))
        except Exception:  # noqa: BLE001 - metrics must answer without Redis
            pass
        return self.bytes(m.render(), content_type="text/plain; version=0.0.4")  # UTF-8 (aiohttp refuses charset here)

    @app.page("/rules", base=Guarded, name="gradeflow-rules")
    async def rules(self: View, request: Request) -> Response:
        control = getattr(app, "gradeflow_rules", None)
        if control is None:
            return self.json({"error": "this worker does not follow the rules-control topic"}, status=404)
        return self.json(control.status())

    @app.page("/openapi.json", base=Guarded, name="gradeflow-openapi")
    async def openapi_json(self: View, request: Request) -> Response:
        return self.json(spec)

    console.register(app, settings, table, ruleset, downstream, Guarded)
    shadow_diff.register(app, settings, ruleset, Guarded)  # /rules/diff: the blast radius of a shadow ruleset
