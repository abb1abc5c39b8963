"""The live blast radius: ``gradeflow rules diff CANDIDATE`` and the worker's ``GET /rules/diff``.

Both read the ``grade-shadow-diffs`` topic from its beginning to its end as of the question
(:func:`streams.readback.read_to_end`) and keep each customer's latest record: the workers publish
one whenever a customer's active or shadow grades change, in the same batch as the state that
holds them, so the latest record of every customer is their current pair of grades, agreeing ones
included. Reading the topic rather than a worker's table or Redis gives every asker the same
answer, whichever worker answers and however the partitions are spread, and needs no other store;
the answer is then the pure :func:`rules.diff.blast_radius`, the function the offline
``rules diff --against HISTORY`` uses too.
"""

from __future__ import annotations

from typing import Any

import orjson

from rules import diff
from rules.engine import CompiledRuleset
from schemas.errors import ConfigurationError, ServerUnavailable
from streams.settings import shadow_diffs_topic


def read_records(settings: Any) -> dict[str, dict[str, Any]]:
    """Each customer's latest ``grade-shadow-diffs`` record (customer_id → document), read to the
    topic's end as of now. Blocking (kafka-python): the worker calls it in a thread."""
    from kafka import KafkaConsumer, TopicPartition

    from streams.kafka_config import kafka_python_options
    from streams.readback import read_to_end

    topic = shadow_diffs_topic(settings)
    try:
        consumer = KafkaConsumer(**kafka_python_options(settings), group_id=None, enable_auto_commit=False)
    except Exception as exc:  # kafka-python's NoBrokersAvailable and friends
        raise ServerUnavailable(f"Kafka at {settings.kafka_bootstrap} is not reachable ({exc})") from exc
    latest: dict[str, dict[str, Any]] = {}
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ConfigurationError(f"topic {topic} does not exist: no worker runs a shadow ruleset "
                                     f"(GRADEFLOW_SHADOW_RULESETS)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        for _tp, records in read_to_end(consumer, tps):
            for r in records:
                # Keyed by customer, so a customer's records are on one partition, in order.
                if r.value is not None:
                    doc = orjson.loads(r.value)
                    latest[doc["customer_id"]] = doc
    finally:
        consumer.close()
    return latest


def pairs_of(records: dict[str, dict[str, Any]], candidate: CompiledRuleset) -> list[diff.Pair]:
    """The customers' grade pairs for ``candidate`` from their latest records (those its shadow
    follows); detail where it differs, from the record's differences."""
    out = []
    for customer_id in sorted(records):
        doc = records[customer_id]
        mine = next((s for s in doc["shadows"]
                     if (s["ruleset"]["id"], s["ruleset"]["version"]) == (candidate.id, candidate.version)), None)
        if mine is None:
            continue
        detail = {d["ladder"]: (d.get("values", {}), d.get("reasons", [])) for d in mine["differences"]}
        out.append(diff.Pair(customer_id, dict(doc["grades"]), dict(mine["grades"]), detail))
    return out


def live_diff(records: dict[str, dict[str, Any]], active: CompiledRuleset, candidate: CompiledRuleset,
              sample: int = diff.SAMPLE) -> dict[str, Any]:
    """The blast radius of promoting ``candidate`` over ``active``, from the latest records.

    ConfigurationError when no record carries ``candidate`` (it is not running as a shadow)."""
    pairs = pairs_of(records, candidate)
    if not pairs and records:
        raise ConfigurationError(f"{candidate.key} is not running as a shadow ruleset (GRADEFLOW_SHADOW_RULESETS); "
                                 f"for a history, use --against HISTORY")
    return diff.blast_radius({"id": active.id, "version": active.version}, candidate, pairs, sample)


def candidate_of(shadows: tuple[CompiledRuleset, ...], asked: str | None) -> CompiledRuleset:
    """The shadow ruleset ``asked`` names (``id@version``; default: the only one); ValueError if none."""
    if asked is None:
        if len(shadows) == 1:
            return shadows[0]
        raise ValueError("name the candidate: ?candidate=" + "|".join(rs.key for rs in shadows))
    for rs in shadows:
        if rs.key == asked:
            return rs
    raise ValueError(f"{asked!r} is not a shadow ruleset of this worker; shadows: "
                     + (", ".join(rs.key for rs in shadows) or "none (GRADEFLOW_SHADOW_RULESETS)"))


def register(app: Any, settings: Any, ruleset: CompiledRuleset, guarded: Any) -> None:
    """``GET /rules/diff[?candidate=id@version][&sample=N]``: the live blast radius, behind the API token."""
    import asyncio

    from faust.web import Request, Response, View

    @app.page("/rules/diff", base=guarded, name="gradeflow-rules-diff")
    async def rules_diff(self: View, request: Request) -> Response:
        stats = getattr(app, "gradeflow_shadow", None)
        shadows = stats.shadows if stats is not None else ()
        query = request.query
        try:
            candidate = candidate_of(shadows, query.get("candidate"))
            sample = int(query.get("sample", diff.SAMPLE))
            if not 0 <= sample <= 1000:
                raise ValueError("sample must be between 0 and 1000")
        except ValueError as exc:
            return self.json({"error": str(exc)}, status=400)
        try:
            records = await asyncio.to_thread(read_records, settings)
            return self.json(live_diff(records, ruleset, candidate, sample))
        except ServerUnavailable as exc:
            return self.json({"error": str(exc)}, status=503)
        except ConfigurationError as exc:
            return self.json({"error": str(exc)}, status=404)


def api_paths() -> dict[str, Any]:
    """``/rules/diff`` for /openapi.json."""
    return {"/rules/diff": {"get": {
        "summary": "The blast radius of promoting a shadow ruleset, from the live shadow state",
        "security": [{"bearer": []}],
        "parameters": [
            {"name": "candidate", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "id@version of a shadow ruleset (default: the only one)"},
            {"name": "sample", "in": "query", "required": False, "schema": {"type": "integer"},
             "description": "key customers downgraded shown per ladder (default 10)"}],
        "responses": {"200": {"description": "Per ladder: from-to matrix, key downgrades, alerts, distribution.",
                              "content": {"application/json": {}}},
                      "400": {"description": "No such shadow ruleset, or a bad parameter."},
                      "401": {"description": "Missing or wrong bearer token."},
                      "404": {"description": "No shadow ruleset runs (no grade-shadow-diffs topic)."},
                      "503": {"description": "Kafka is unreachable."}}}}}
