"""The reasons of an evaluation, in sentences: what each score's metric was and which band it
fell in, how each condition held, and per ladder the lines that explain its grade.

They are built only when someone reads :attr:`rules.engine.Evaluation.reasons` (three events in
four change no grade and never need them); a score's sentence for a small integer value is kept
on the compiled ruleset, since most grade changes say one of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rules.metrics import MetricDef, phrase, show
from schemas.money import format_minor

if TYPE_CHECKING:  # annotations only: the engine and the deciders import this module
    from rules.deciders import Check, CompiledScore, Env, Population
    from rules.engine import CompiledRuleset

_SYMBOL = {"eq": "=", "ne": "≠", "gt": ">", "ge": "≥", "lt": "<", "le": "≤", "in": "in", "not_in": "not in"}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0")


def _unit(m: MetricDef, value: float) -> Any:
    return int(value) if m.kind in ("money", "days", "count") else value


def _checks_words(m: MetricDef, value: Any, checks: tuple[Check, ...], pop: Any, currency: str) -> str:
    parts = []
    for c in checks:
        if c.op == "eq" and c.q is None and value == c.target and m.family == "attribute":
            continue  # "stage = negotiating" already says it
        if c.op == "in" and value in c.target and m.family == "attribute":
            parts.append("(one of " + ", ".join(show(m.kind, t, currency) for t in sorted(c.target, key=str)) + ")")
            continue
        if c.op == "exists":
            parts.append("is set" if c.target else "is not set")
            continue
        if c.q is not None:
            t = pop.get((m.name, c.q)) if pop is not None else None
            pct = f"{c.q * 100:g}th percentile of the population"
            shown = f"the {pct} (not known yet)" if t is None else f"the {pct} ({show(m.kind, _unit(m, t), currency)})"
        elif c.op in ("in", "not_in"):
            shown = "{" + ", ".join(show(m.kind, t, currency) for t in sorted(c.target, key=str)) + "}"
        else:
            shown = show(m.kind, c.target, currency)
        parts.append(f"{_SYMBOL[c.op]} {shown}")
    return " and ".join(parts)


def _metric_sentence(rs: CompiledRuleset, score: CompiledScore, value: Any, points: int, bound: Any) -> str:
    cmp = "≥" if score.rising else "≤"
    if score.metric == "monetary":
        shown = f"net spend {format_minor(value or 0, rs.currency)} {rs.currency} in the last {rs.window_days} days"
        limit = None if bound is None else f"{format_minor(bound, rs.currency)} {rs.currency}"
    elif score.metric == "frequency":
        shown = f"{value} purchase{'s' if value != 1 else ''} in the last {rs.window_days} days"
        limit = None if bound is None else str(bound)
    elif score.metric == "recency_days":
        shown = "no purchase yet" if value is None else f"last purchase {value} day{'s' if value != 1 else ''} ago"
        limit = None if bound is None else f"{bound} days"
    else:
        m = rs.defs[score.metric]
        shown = phrase(m, value, rs.currency)
        limit = None if bound is None else show(m.kind, bound, rs.currency)
    band = f"{cmp} {limit}" if limit is not None else "below every band"
    return f"{shown[0].upper()}{shown[1:]} ({band}): {score.name.upper()}={points}."


# Values of a score's metric whose sentences are kept (days, counts; a few yuan of money): a bounded
# set, so the cache cannot grow with the customers, and most grade changes say one of them.
_KEPT = 1000


def _sentence(rs: CompiledRuleset, score: CompiledScore, value: Any, points: int, bound: Any) -> str:
    """:func:`_metric_sentence`, kept for small integer values: it depends on nothing else (the
    points and bound follow from the value), and it is a fifth of a grade change's cost."""
    if value is None or (type(value) is int and -_KEPT <= value <= _KEPT):
        key = (score.name, value)
        said = rs.sentences.get(key)
        if said is None:
            said = rs.sentences[key] = _metric_sentence(rs, score, value, points, bound)
        return said
    return _metric_sentence(rs, score, value, points, bound)


def _explain(rs: CompiledRuleset, values: dict[str, Any], scores: dict[str, int], bounds: dict[str, Any],
             traces: dict[str, Any], population: Population | None) -> dict[str, list[str]]:
    """Per ladder, the sentences that explain the grade :func:`evaluate` decided."""
    env: Env = (values, scores, population)
    sentences = {s.name: _sentence(rs, s, values[s.metric], scores[s.name], bounds[s.name]) for s in rs.scores}
    out: dict[str, list[str]] = {}
    for ladder in rs.ladders:
        trace, held, decided = traces[ladder.name]
        lines = [sentences[n] for n in ladder.summed]
        lines += [line.replace("{grade}", decided) for line in ladder.decider.explain(env, trace)]
        if held is not None:
            lines.append(held)
        missing = [m for m, q in ladder.quantiles if population is None or population.get((m, q)) is None]
        if missing:
            lines.append(f"The population's thresholds for {', '.join(sorted(set(missing)))} are not known yet: "
                         "relative comparisons do not hold until they are.")
        out[ladder.name] = lines
    return out
