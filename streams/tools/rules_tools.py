"""``gradeflow rules explain`` and ``gradeflow rules try``: a ruleset over a history, offline.

A history is a JSON Lines file of input events as producers write them
(transactions and interactions mixed, told apart by ``type``), in the order
they arrived. It runs through :func:`streams.processor.process_batch` with a
dict as the state store, in batches like the worker, so the grades are the
worker's. Relative grades use the population of the history's customers at
its end (the same sketches the workers merge).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from rules import diff
from rules import population as pop
from rules.changes import json_value
from rules.engine import CompiledRuleset, Evaluation, evaluate
from rules.metrics import show
from rules.state import CustomerState
from schemas.events import INTERACTION_TYPES
from streams.processor import INTERACTIONS, TRANSACTIONS, Record, process_batch

BATCH = 2000
_INTERACTION_TYPES = frozenset(INTERACTION_TYPES)


@dataclass
class Run:
    """A ruleset run over a history: final states, every output, and the end of the history."""

    rs: CompiledRuleset
    states: dict[str, bytes] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)
    events: int = 0
    end: datetime | None = None
    thresholds: dict[tuple[str, float], float] = field(default_factory=dict)

    def state(self, customer_id: str) -> CustomerState | None:
        raw = self.states.get(customer_id)
        return CustomerState.from_bytes(raw) if raw is not None else None

    def evaluate(self, customer_id: str) -> Evaluation:
        """The customer's evaluation as of the end of the history (as a clock sweep would see it)."""
        state = self.state(customer_id)
        assert state is not None and self.end is not None
        return evaluate(self.rs, state, self.end, self.thresholds or None)


def read_history(path: str | Path) -> list[Record]:
    """Records of a JSON Lines history, each as the topic its ``type`` belongs to."""
    records = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            raw = line.strip()
            if not raw:
                continue
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError:
                doc = None
            kind = doc.get("type") if isinstance(doc, dict) else None
            interaction = isinstance(kind, str) and kind in _INTERACTION_TYPES and "amount" not in doc  # type: ignore[operator]
            customer = doc.get("customer_id") if isinstance(doc, dict) else None
            key = customer.encode() if isinstance(customer, str) else None
            role, topic = (INTERACTIONS, "interactions") if interaction else (TRANSACTIONS, "transactions")
            records.append(Record(role, topic, 0, number, key, raw))
    return records


class _Store(dict):
    def get(self, customer_id: str) -> bytes | None:  # type: ignore[override]
        return dict.get(self, customer_id)


def run(rs: CompiledRuleset, records: list[Record]) -> Run:
    """Run ``rs`` over ``records`` with the worker's code; compute the population at the end."""
    out = Run(rs)
    store = _Store()
    now = datetime.now(timezone.utc)
    for start in range(0, len(records), BATCH):
        result = process_batch(records[start:start + BATCH], rs, store, now, check_keys=False)
        for customer_id, (raw, _) in result.states.items():
            store[customer_id] = raw
        out.changes += [orjson.loads(v) for _, v in result.grade_changes]
        out.alerts += [orjson.loads(v) for _, v in result.alerts]
        out.dead += [orjson.loads(v) for _, v in result.dead_letters]
        out.events += result.applied
    out.states = dict(store)
    last = [CustomerState.from_bytes(raw).last_event_ts for raw in store.values()]
    known = [ts for ts in last if ts is not None]
    if known:
        out.end = datetime.fromtimestamp(max(known), rs.tz)
        if rs.quantiles:
            sketches = pop.build(rs, (CustomerState.from_bytes(raw) for raw in store.values()), out.end)
            out.thresholds = pop.thresholds(rs, sketches)
    return out


def explain(rs: CompiledRuleset, history: str | Path, customer_id: str) -> tuple[int, str]:
    """The text of ``rules explain`` and its exit code."""
    result = run(rs, read_history(history))
    state = result.state(customer_id)
    if state is None:
        known = sorted(result.states)
        shown = ", ".join(known[:10]) + (", …" if len(known) > 10 else "")
        return 1, f"customer {customer_id!r} has no valid event in {history}; customers: {shown or 'none'}"
    ev = result.evaluate(customer_id)
    assert result.end is not None
    lines = [f"customer {customer_id}: ruleset {rs.id}@{rs.version}, as of {result.end.isoformat()} (end of the history)"]
    lines.append("metrics:")
    for name in sorted(ev.values):
        kind = rs.defs[name].kind if name in rs.defs else "count"
        lines.append(f"  {name} = {show(kind, ev.values[name], rs.currency)}")
    if ev.scores:
        lines.append("scores: " + " ".join(f"{k}={v}" for k, v in ev.scores.items()) + f" (code {ev.code})")
    for (metric, q), value in sorted(result.thresholds.items()):
        kind = rs.defs[metric].kind
        lines.append(f"population: {metric} at quantile {q:g} = {show(kind, int(value) if kind != 'number' else value, rs.currency)}"
                     f" (±{pop.RELATIVE_ACCURACY:.0%})")
    for ladder in rs.ladders:
        lines.append(f"ladder {ladder.name}: grade {ev.grades[ladder.name]}")
        lines += [f"  - {reason}" for reason in ev.reasons[ladder.name]]
    mine = [c for c in result.changes if c["customer_id"] == customer_id]
    lines.append(f"grade changes during the history: {len(mine)}")
    for c in mine:
        lines.append(f"  {c['as_of']} {c['ladder']}: {c['previous_grade'] or '-'} → {c['grade']} ({c['direction']}, "
                     f"{c['cause']['kind']} {c['cause']['event_id'] or ''})".rstrip())
    return 0, "\n".join(lines)


def distribution(result: Run) -> dict[str, Counter[str]]:
    """Per ladder, how many customers hold each grade at the end of the history."""
    counts: dict[str, Counter[str]] = {ladder.name: Counter() for ladder in result.rs.ladders}
    for customer_id in result.states:
        ev = result.evaluate(customer_id)
        for name, grade in ev.grades.items():
            counts[name][grade] += 1
    return counts


def try_ruleset(rs: CompiledRuleset, history: str | Path, against: CompiledRuleset | None = None,
                report: str | Path | None = None) -> str:
    """The text of ``rules try``; with ``report``, also an HTML report there (streams/tools/report.py)."""
    records = read_history(history)
    result = run(rs, records)
    lines = [f"ruleset {rs.id}@{rs.version} over {history}: {len(records)} events, {result.events} applied, "
             f"{len(result.dead)} dead letters, {len(result.states)} customers"
             + (f", as of {result.end.isoformat()}" if result.end else "")]
    reasons = Counter(d["reason"] for d in result.dead)
    if reasons:
        lines.append("  dead letters: " + ", ".join(f"{r} {n}" for r, n in reasons.most_common()))
    lines.append(f"  grade changes {len(result.changes)}, alerts {len(result.alerts)}")
    mine = distribution(result)
    for ladder in rs.ladders:
        lines.append(f"ladder {ladder.name}:")
        total = sum(mine[ladder.name].values()) or 1
        for grade in ladder.grades:
            n = mine[ladder.name][grade]
            lines.append(f"  {grade:<12} {n:>7}  {100 * n / total:5.1f}%")
    flows: list[tuple[str, list[str], list[str], Counter[tuple[str, str]]]] = []
    if against is None:
        _report(report, rs, lines, mine, flows, None)
        return "\n".join(lines)
    other = run(against, records)
    lines.append(f"against {against.id}@{against.version}: customers moving from its grade to this ruleset's")
    theirs = {ladder.name: ladder for ladder in against.ladders}
    for ladder in rs.ladders:
        if ladder.name not in theirs:
            lines.append(f"ladder {ladder.name}: not in {against.id}@{against.version}")
            continue
        moves = diff.moves(pairs(other, result, detail=False), ladder.name)
        same = sum(n for (a, b), n in moves.items() if a == b)
        flows.append((ladder.name, list(theirs[ladder.name].grades), list(ladder.grades), moves))
        lines.append(f"ladder {ladder.name}: {same} unchanged, {sum(moves.values()) - same} move")
        for (a, b), n in sorted(moves.items(), key=lambda kv: (-kv[1], kv[0])):
            if a != b:
                lines.append(f"  {a} → {b}: {n}")
    for name in theirs:
        if name not in {ladder.name for ladder in rs.ladders}:
            lines.append(f"ladder {name}: only in {against.id}@{against.version}")
    _report(report, rs, lines, mine, flows, f"{against.id}@{against.version}")
    return "\n".join(lines)


def _report(path: str | Path | None, rs: CompiledRuleset, lines: list[str], mine: dict[str, Counter[str]],
            flows: list[tuple[str, list[str], list[str], Counter[tuple[str, str]]]], against: str | None) -> None:
    if path is None:
        return
    from streams.tools.report import write_report

    title = f"rules try: {rs.id}@{rs.version}" + (f" against {against}" if against else "")
    write_report(path, title, lines, [(lad.name, list(lad.grades), mine[lad.name]) for lad in rs.ladders], flows,
                 against)


def pairs(active: Run, candidate: Run, detail: bool = True) -> list[diff.Pair]:
    """Each customer of ``candidate``'s run with their grades under both rulesets as of the end of
    the history (``-``: none under ``active``); with ``detail``, the candidate's metrics and
    reasons where its grade differs. ``rules try --against`` and ``rules diff --against`` use it."""
    out = []
    ladders = candidate.rs.ladders
    for customer_id in candidate.states:
        ev = candidate.evaluate(customer_id)
        old = dict(active.evaluate(customer_id).grades) if customer_id in active.states else {}
        shown: dict[str, tuple[dict[str, Any], list[str]]] = {}
        if detail:
            for lad in ladders:
                if ev.grades[lad.name] != old.get(lad.name):
                    shown[lad.name] = ({n: json_value(candidate.rs, n, ev.values.get(n)) for n in lad.metrics},
                                       ev.reasons[lad.name])
        out.append(diff.Pair(customer_id, old, dict(ev.grades), shown))
    return out


def diff_offline(active: CompiledRuleset, candidate: CompiledRuleset, history: str | Path,
                 sample: int = diff.SAMPLE) -> dict[str, Any]:
    """``gradeflow rules diff CANDIDATE --against HISTORY``: the blast radius of promoting ``candidate``
    over ``active``, both run over the history with the worker's code (as ``rules try --against``)."""
    records = read_history(history)
    return diff.blast_radius({"id": active.id, "version": active.version}, candidate,
                             pairs(run(active, records), run(candidate, records)), sample)
