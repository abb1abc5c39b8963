"""The blast radius of a rule change: what promoting a candidate ruleset would do to the customers.

One pure function, :func:`blast_radius`, answers from per-customer pairs of grades (the active
ruleset's and the candidate's), wherever they come from: the live shadow state
(streams/shadow_diff.py, from the ``grade-shadow-diffs`` and ``grade-changes`` topics) or an offline
run of both rulesets over a history (``gradeflow rules diff --against``, the same computation as
``gradeflow rules try --against``). Per ladder of the candidate:

- the from-to matrix of customers (active grade → candidate grade), the unchanged diagonal included;
- the key customers who would be downgraded: how many, and a sample with their metrics and reasons;
- the alerts the promotion would send, by severity (the same rule as the worker's alerts);
- how the distribution moves: per grade, customers now and after.

Customers without an active grade on a ladder (a ladder the candidate adds) move from ``-``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rules.changes import alert_severity, direction
from rules.engine import CompiledRuleset

NONE = "-"  # no grade on that ladder
SAMPLE = 10


@dataclass(slots=True)
class Pair:
    """One customer's grades under both rulesets; ``detail``: ladder → (metric values, reasons) of
    the candidate's evaluation, where known (for the sample of key downgrades)."""

    customer_id: str
    active: dict[str, str]
    candidate: dict[str, str]
    detail: dict[str, tuple[dict[str, Any], list[str]]] = field(default_factory=dict)


def moves(pairs: Iterable[Pair], ladder: str) -> Counter[tuple[str, str]]:
    """(active grade or ``-``, candidate grade) → customers, for one ladder of the candidate."""
    out: Counter[tuple[str, str]] = Counter()
    for p in pairs:
        new = p.candidate.get(ladder)
        if new is not None:
            out[(p.active.get(ladder) or NONE, new)] += 1
    return out


def blast_radius(active: dict[str, str], candidate: CompiledRuleset, pairs: list[Pair],
                 sample: int = SAMPLE) -> dict[str, Any]:
    """What promoting ``candidate`` would do (``active``: the active ruleset's ``{"id", "version"}``),
    as a JSON-ready document; equal inputs give equal documents (sorted, no clock)."""
    ladders = []
    alerts_total: Counter[str] = Counter()
    for ladder in candidate.ladders:
        name = ladder.name
        matrix = moves(pairs, name)
        now: Counter[str] = Counter()
        after: Counter[str] = Counter()
        for (was, becomes), n in matrix.items():
            now[was] += n
            after[becomes] += n
        alerts: Counter[str] = Counter()
        downgraded = []
        for p in pairs:
            new: str | None = p.candidate.get(name)
            old: str | None = p.active.get(name)
            if new is None or old == new or direction(ladder, old, new) != "downgrade":
                continue
            severity = alert_severity(ladder, old, new)
            if severity is None:
                continue
            alerts[severity] += 1
            downgraded.append(p)
        downgraded.sort(key=lambda p: p.customer_id)
        shown = []
        for p in downgraded[:sample]:
            values, reasons = p.detail.get(name, ({}, []))
            shown.append({"customer_id": p.customer_id, "from": p.active.get(name), "to": p.candidate[name],
                          "values": values, "reasons": reasons})
        alerts_total.update(alerts)
        # Grades the candidate has, in its order, then those only the active ruleset gives.
        order = list(ladder.grades) + sorted(g for g in now if g not in ladder.rank and g != NONE)
        if now.get(NONE):
            order.append(NONE)
        ladders.append({
            "name": name,
            "customers": sum(matrix.values()),
            "unchanged": sum(n for (a, b), n in matrix.items() if a == b),
            "matrix": [{"from": a, "to": b, "n": n} for (a, b), n in sorted(matrix.items())],
            "key_downgrades": {"count": len(downgraded), "sample": shown},
            "alerts": dict(sorted(alerts.items())),
            "distribution": [{"grade": g, "now": now.get(g, 0), "after": after.get(g, 0)} for g in order],
        })
    return {
        "active": dict(active),
        "candidate": {"id": candidate.id, "version": candidate.version},
        "customers": len(pairs),
        "differing": sum(1 for p in pairs if any(p.candidate.get(lad.name) is not None
                                                 and p.candidate.get(lad.name) != p.active.get(lad.name)
                                                 for lad in candidate.ladders)),
        "alerts": dict(sorted(alerts_total.items())),
        "ladders": ladders,
    }


def without_detail(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without the sample's metric values and reasons: what two answers computed as of
    different instants (the live state, graded as of each customer's own last instant; an offline
    run, as of the history's end) must agree on."""
    out = dict(doc)
    out["ladders"] = [{**lad, "key_downgrades": {"count": lad["key_downgrades"]["count"],
                                                 "sample": [{k: v for k, v in s.items() if k not in ("values", "reasons")}
                                                            for s in lad["key_downgrades"]["sample"]]}}
                      for lad in doc["ladders"]]
    return out


def render(doc: dict[str, Any]) -> str:
    """The text ``gradeflow rules diff`` prints."""
    a, c = doc["active"], doc["candidate"]
    lines = [f"promoting {c['id']}@{c['version']} over {a['id']}@{a['version']}: {doc['customers']} customers, "
             f"{doc['differing']} would change grade; alerts "
             + (", ".join(f"{s} {n}" for s, n in doc["alerts"].items()) or "none")]
    for lad in doc["ladders"]:
        lines.append(f"ladder {lad['name']}: {lad['unchanged']} unchanged, {lad['customers'] - lad['unchanged']} move; "
                     f"key customers downgraded {lad['key_downgrades']['count']}; alerts "
                     + (", ".join(f"{s} {n}" for s, n in lad["alerts"].items()) or "none"))
        lines.append("  from → to: customers")
        for m in lad["matrix"]:
            lines.append(f"    {m['from']} → {m['to']}: {m['n']}" + ("" if m["from"] != m["to"] else " (unchanged)"))
        lines.append("  grade: now → after")
        for d in lad["distribution"]:
            lines.append(f"    {d['grade']:<12} {d['now']:>7} → {d['after']:<7} ({d['after'] - d['now']:+d})")
        for s in lad["key_downgrades"]["sample"]:
            lines.append(f"  downgraded: {s['customer_id']} {s['from']} → {s['to']}")
            lines += [f"    - {r}" for r in s.get("reasons", [])]
    return "\n".join(lines)
