"""The console's JSON API (see streams/console/__init__.py), registered on the worker's web server."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from rules.engine import CompiledRuleset, evaluate
from rules.state import CustomerState
from streams.console.agent import feed_of
from streams.console.feed import ALERTS_CAP, AT_RISK_CAP, TIMELINE_CAP

MAX_LIMIT = 500
SEVERITIES = ("info", "warning", "critical")
KINDS = ("downgrade", "at_risk")


def keep_sentence(alert: dict[str, Any], tz: Any) -> str:
    """What keeps a warned customer's grade, from the warning: its drop instant and what time changes then
    (rules/risk.py puts the reasons that change at the drop after ``Then:`` in the summary)."""
    due = datetime.fromisoformat(alert["due_at"]).astimezone(tz)
    grade = alert.get("previous_grade")
    then = str(alert.get("summary", "")).partition("Then: ")[2]
    if "last purchase" in then.lower() or "no purchase" in then.lower():
        return f"one purchase before {due:%Y-%m-%d %H:%M} keeps {grade}"
    return f"new activity before {due:%Y-%m-%d %H:%M} keeps {grade} (else: {then.strip() or 'time alone lowers it'})"


def lag_of(app: Any) -> dict[str, Any]:
    """This worker's consumer lag per assigned partition (as gradeflow_consumer_lag says it)."""
    from streams.downstream.metrics import _LagCollector

    rows = []
    for family in _LagCollector(app).collect():
        for sample in family.samples:
            rows.append({"topic": sample.labels["topic"], "partition": int(sample.labels["partition"]),
                         "lag": int(sample.value)})
    return {"total": sum(r["lag"] for r in rows), "partitions": rows}


def _limit(request: Any, default: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    value = int(raw)  # ValueError: answered as 400
    if not 1 <= value <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    return value


def _choice(request: Any, name: str, allowed: tuple[str, ...] | list[str]) -> str | None:
    value = request.query.get(name) or None
    if value is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}")
    return value


def next_look(app: Any, states: Any, key: bytes) -> tuple[str | None, str]:
    """The instant the worker's clock will look at the customer next, and what that answer rests on."""
    clock = getattr(app, "gradeflow_clock", None)
    if clock is None or clock.mode == "off":
        return None, "the clock is off (GRADEFLOW_CLOCK)"
    partition = states.partition_of(key)
    schedule = clock.schedules.get(partition) if partition is not None else None
    if schedule is None:
        return None, "another worker holds this customer"
    due = schedule.get(key)
    if due is None:
        return None, "time alone changes nothing for this customer"
    exact = schedule.is_exact(key)
    return (datetime.fromtimestamp(due, clock.rs.tz).isoformat(),
            "due instant" if exact else "first instant the clock checks (a lower bound)")


def current_from_table(raw: bytes, rs: CompiledRuleset) -> dict[str, Any]:
    """Grades and reasons per ladder as of the customer's latest event (the worker's own state)."""
    state = CustomerState.from_bytes(raw)
    if state.last_event_ts is None:
        return {}
    as_of = datetime.fromtimestamp(state.last_event_ts, rs.tz)
    ev = evaluate(rs, state, as_of)
    return {ladder: {"grade": grade, "reasons": ev.reasons.get(ladder, []), "as_of": as_of.isoformat()}
            for ladder, grade in state.grades.items()}


def add_api(app: Any, settings: Any, table: Any, ruleset: CompiledRuleset, downstream: Any, guarded: Any) -> None:
    from faust.web import Request, Response, View

    from streams.faustext.tables import FaustStateStore

    def active() -> CompiledRuleset:
        # The ruleset a promotion made active (streams/rules_control.py), else the one started with.
        rules = getattr(app, "gradeflow_rules", None)
        return rules.active if rules is not None else ruleset

    def ladder_names() -> list[str]:
        return [lad.name for lad in active().ladders]

    states = FaustStateStore(table)

    def bad(self: View, exc: Exception) -> Response:
        return self.json({"error": str(exc)}, status=400)

    def down(self: View, exc: Exception) -> Response:
        return self.json({"error": f"redis unavailable: {type(exc).__name__}"}, status=503)

    @app.page("/api/overview", base=guarded, name="gradeflow-api-overview")
    async def overview(self: View, request: Request) -> Response:
        feed = feed_of(downstream)
        now = time.time()
        rs = active()
        try:
            counts = await downstream.grades().counts([lad.name for lad in rs.ladders])
            moves = await feed.moves(now)
            rates = await feed.rates(60, now)
            dead = await feed.dead_letters()
        except Exception as exc:  # noqa: BLE001 - Redis down: say so
            return down(self, exc)
        out = []
        for lad in rs.ladders:
            known = counts.get(lad.name, {})
            out.append({
                "name": lad.name, "grades": list(lad.grades), "key": sorted(lad.key or ()),
                "counts": {g: int(known.get(g, 0)) for g in lad.grades},
                "moves": {window: [{"from": a, "to": b, "n": n}
                                   for (a, b), n in sorted(moves[window].get(lad.name, {}).items())]
                          for window in ("hour", "day")},
            })
        return self.json({
            "generated_at": datetime.fromtimestamp(now, timezone.utc).isoformat(),
            "ruleset": {"id": rs.id, "version": rs.version},
            "ladders": out, "changes_per_minute": rates, "dead_letters": dead, "lag": lag_of(app),
        })

    @app.page("/api/alerts", base=guarded, name="gradeflow-api-alerts")
    async def alerts(self: View, request: Request) -> Response:
        try:
            limit = _limit(request, 100)
            severity = _choice(request, "severity", SEVERITIES)
            ladder = _choice(request, "ladder", ladder_names())
            kind = _choice(request, "kind", KINDS)
        except ValueError as exc:
            return bad(self, exc)
        try:
            found = await feed_of(downstream).alerts(limit, severity, ladder, kind)
        except Exception as exc:  # noqa: BLE001
            return down(self, exc)
        return self.json({"alerts": found, "kept": ALERTS_CAP})

    @app.page("/api/at-risk", base=guarded, name="gradeflow-api-at-risk")
    async def at_risk(self: View, request: Request) -> Response:
        try:
            limit = _limit(request, 100)
            ladder = _choice(request, "ladder", ladder_names())
        except ValueError as exc:
            return bad(self, exc)
        try:
            found, now = await feed_of(downstream).at_risk(limit, ladder)
        except Exception as exc:  # noqa: BLE001
            return down(self, exc)
        tz = active().tz
        for doc in found:
            doc["keep"] = keep_sentence(doc, tz)
        clock_now = datetime.fromtimestamp(now, tz).isoformat() if now is not None else None
        return self.json({"customers": found, "clock": clock_now, "kept": AT_RISK_CAP})

    @app.page("/api/customers/{customer_id}/timeline", base=guarded, name="gradeflow-api-timeline")
    async def timeline(self: View, request: Request, customer_id: str) -> Response:
        from streams.downstream.web import is_ready

        try:
            changes = await feed_of(downstream).timeline(customer_id)
        except Exception as exc:  # noqa: BLE001
            return down(self, exc)
        key = customer_id.encode()
        ready, _ = is_ready(app)
        current: dict[str, Any] = {}
        look, basis = None, "this worker is not ready"
        if ready:
            look, basis = next_look(app, states, key)
            if states.partition_of(key) is not None:
                raw = table.get(key)
                if raw is not None:
                    current = current_from_table(raw, active())
        if not current:  # not held here: the latest change of each ladder says why
            for change in reversed(changes):
                current[change["ladder"]] = {"grade": change["grade"], "reasons": change.get("reasons") or [],
                                             "as_of": change["as_of"]}
        if not changes and not current:
            return self.json({"error": f"no grade known for customer {customer_id!r}"}, status=404)
        return self.json({"customer_id": customer_id, "current": current, "changes": changes,
                          "kept": TIMELINE_CAP, "next_look": look, "next_look_basis": basis})


def api_paths() -> dict[str, Any]:
    """The console's routes for /openapi.json."""
    secured: list[dict[str, list[str]]] = [{"bearer": []}]

    def json_ok(text: str) -> dict[str, Any]:
        return {"description": text, "content": {"application/json": {"schema": {"type": "object"}}}}

    err = {"401": {"description": "Missing or wrong bearer token (only when GRADEFLOW_API_TOKEN is set)."},
           "503": {"description": "Redis is unreachable."}}
    q = [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}}]
    ladder = {"name": "ladder", "in": "query", "schema": {"type": "string"}}
    return {
        "/console/": {"get": {"summary": "The console (HTML); it asks for the token and sends it to /api/*",
                              "security": [], "responses": {"200": {"description": "HTML",
                                                                    "content": {"text/html": {}}}}}},
        "/api/overview": {"get": {
            "summary": "Per ladder grade counts and from-to moves (last hour, last day); changes per minute by "
                       "cause; dead letters by reason; this worker's consumer lag; the ruleset",
            "security": secured, "responses": {"200": json_ok("The overview."), **err}}},
        "/api/alerts": {"get": {
            "summary": f"Recent alerts, newest first (the latest {ALERTS_CAP} are kept)",
            "parameters": q + [ladder,
                               {"name": "severity", "in": "query", "schema": {"enum": list(SEVERITIES)}},
                               {"name": "kind", "in": "query", "schema": {"enum": list(KINDS)}}],
            "security": secured, "responses": {"200": json_ok("Alerts."), "400": json_ok("A bad parameter."),
                                               **err}}},
        "/api/at-risk": {"get": {
            "summary": "Warned key customers whose drop by time alone is ahead, soonest first, with what keeps "
                       "their grade",
            "parameters": q + [ladder], "security": secured,
            "responses": {"200": json_ok("Customers at risk."), "400": json_ok("A bad parameter."), **err}}},
        "/api/customers/{customer_id}/timeline": {"get": {
            "summary": f"The customer's latest {TIMELINE_CAP} grade changes with causes, current reasons, and the "
                       "next instant the clock looks at them",
            "parameters": [{"name": "customer_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "security": secured,
            "responses": {"200": json_ok("The timeline."), "404": json_ok("No grade known."), **err}}},
    }
