"""How a compiled ruleset scores and decides: scores, conditions and the deciders of a ladder.

:func:`~rules.engine.compile_ruleset` builds these from the validated model once; on the hot path
a ladder's decider only compares numbers (``decide``) and returns a trace, from which it says why
(``explain``) only when someone reads the reasons (rules/explain.py words them).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rules.explain import _SYMBOL, _cap, _checks_words, _num
from rules.metrics import MetricDef, phrase, show
from rules.ruleset import Cond, Ruleset, convert, quantile_of

Population = Mapping[tuple[str, float], float]  # (metric, quantile) → threshold in the metric's unit
Env = tuple[dict[str, Any], dict[str, int], "Population | None"]  # values, scores, population thresholds

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "ge": operator.ge, "lt": operator.lt,
    "le": operator.le, "in": lambda v, t: v in t, "not_in": lambda v, t: v not in t,
}


@dataclass(slots=True, frozen=True)
class CompiledScore:
    name: str
    metric: str
    rising: bool  # True: "min" bands (≥), False: "max" bands (≤)
    bands: tuple[tuple[int, int], ...]  # (bound, score); money bounds in minor units
    otherwise: int


def _score(score: CompiledScore, value: Any) -> tuple[int, Any]:
    """The score and the bound that gave it (None when ``else`` applied)."""
    if value is None:
        return score.otherwise, None
    if score.rising:
        for bound, points in score.bands:
            if value >= bound:
                return points, bound
    else:
        for bound, points in score.bands:
            if value <= bound:
                return points, bound
    return score.otherwise, None


# ---------------------------------------------------------------- conditions


@dataclass(slots=True, frozen=True)
class Check:
    """One comparison of a metric's value: ``op`` against ``target`` or a population quantile ``q``."""

    op: str
    target: Any
    q: float | None = None


class CompiledCond:
    """A condition as a closure (``test``) and its explanation (``words``)."""

    __slots__ = ("test", "words")

    def __init__(self, test: Callable[[dict, Any], bool], words: Callable[[dict, Any], str]) -> None:
        self.test = test
        self.words = words


def _checks_hold(value: Any, checks: tuple[Check, ...], name: str, pop: Any) -> bool:
    for c in checks:
        if c.op == "exists":
            if (value is not None) != c.target:
                return False
            continue
        if value is None:
            return False
        target = c.target
        if c.q is not None:
            target = pop.get((name, c.q)) if pop is not None else None
            if target is None:
                return False  # the population is not known yet
        if not _OPS[c.op](value, target):
            return False
    return True


def compile_checks(rs: Ruleset, m: MetricDef, node: Any, top_percent: Any = None) -> tuple[Check, ...]:
    checks = []
    for op, raw in node.ops():
        if op == "exists":
            checks.append(Check(op, bool(raw)))
        elif op in ("in", "not_in"):
            checks.append(Check(op, frozenset(convert(m.kind, item, rs.currency) for item in raw)))
        else:
            q = quantile_of(raw)
            checks.append(Check(op, None, q) if q is not None else Check(op, convert(m.kind, raw, rs.currency)))
    if top_percent is not None:
        checks.append(Check("ge", None, round(1 - float(top_percent) / 100, 10)))
    return tuple(checks)


def compile_cond(rs: Ruleset, c: Cond, used: set[str], quantiles: set[tuple[str, float]]) -> CompiledCond:
    currency = rs.currency
    if c.all is not None or c.any is not None:
        subs = [compile_cond(rs, s, used, quantiles) for s in (c.all or c.any or ())]
        if c.all is not None:
            def test_all(values: dict, pop: Any) -> bool:
                for s in subs:
                    if not s.test(values, pop):
                        return False
                return True
            return CompiledCond(test_all, lambda v, p: " and ".join(s.words(v, p) for s in subs))

        def test_any(values: dict, pop: Any) -> bool:
            for s in subs:
                if s.test(values, pop):
                    return True
            return False

        def words_any(values: dict, pop: Any) -> str:
            held = [s.words(values, pop) for s in subs if s.test(values, pop)]
            return " or ".join(held or [s.words(values, pop) for s in subs])
        return CompiledCond(test_any, words_any)
    if c.not_ is not None:
        inner = compile_cond(rs, c.not_, used, quantiles)
        return CompiledCond(lambda v, p: not inner.test(v, p), lambda v, p: f"not ({inner.words(v, p)})")
    assert c.metric is not None
    m = rs.metric(c.metric)
    used.add(m.name)
    checks = compile_checks(rs, m, c, c.top_percent)
    for ch in checks:
        if ch.q is not None:
            quantiles.add((m.name, ch.q))
    name = m.name
    return CompiledCond(
        lambda values, pop: _checks_hold(values[name], checks, name, pop),
        lambda values, pop: f"{phrase(m, values[name], currency)} {_checks_words(m, values[name], checks, pop, currency)}".rstrip(),
    )


# ---------------------------------------------------------------- deciders


class Decider:
    """How one ladder (or one rule's sub-grades) decides: ``decide(env) -> (grade, trace)``."""

    banded = False
    rising = True

    def decide(self, env: Env) -> tuple[str, Any]:
        raise NotImplementedError

    def explain(self, env: Env, trace: Any) -> list[str]:
        raise NotImplementedError


class _TotalBands(Decider):
    """A decider that computes a total (``value``) and grades it against ``min`` bands, best first."""

    banded = True
    bands: tuple[tuple[Any, str], ...]
    otherwise: str

    def value(self, env: Env) -> Any:
        raise NotImplementedError

    def grade_for(self, total: Any) -> tuple[str, Any]:
        for minimum, grade in self.bands:
            if total >= minimum:
                return grade, minimum
        return self.otherwise, None

    def decide(self, env: Env) -> tuple[str, Any]:
        total = self.value(env)
        grade, floor = self.grade_for(total)
        return grade, (total, floor)


class SumBands(_TotalBands):
    """Grade by the sum of scores against ``min`` bands (rfm-5)."""

    banded = True

    def __init__(self, summed: tuple[str, ...], bands: tuple[tuple[int, str], ...], otherwise: str) -> None:
        self.summed, self.bands, self.otherwise = summed, bands, otherwise
        # trace → its sentence: a sum of scores takes few values, and every grade change says one.
        self._said: dict[tuple[int, int | None], list[str]] = {}

    def value(self, env: Env) -> int:
        return sum(map(env[1].__getitem__, self.summed))


    def explain(self, env: Env, trace: Any) -> list[str]:
        said = self._said.get(trace)
        if said is None:
            total, floor = trace
            label = "+".join(n.upper() for n in self.summed)
            why = f"≥ {floor}" if floor is not None else "below every band"
            said = self._said[trace] = [f"{label} = {total} ({why}): grade {{grade}}."]
        return said


class MetricBands(Decider):
    """Grade by ordered bands on one metric; the first band that holds wins."""

    banded = True

    def __init__(self, m: MetricDef, bands: tuple[tuple[str, Any, str], ...], otherwise: str, currency: str) -> None:
        self.m, self.bands, self.otherwise, self.currency = m, bands, otherwise, currency
        self.rising = bands[0][0] in ("ge", "gt")

    def value(self, env: Env) -> Any:
        return env[0][self.m.name]

    def grade_for(self, value: Any) -> tuple[str, Any]:
        if value is None:
            return self.otherwise, None
        for op, bound, grade in self.bands:
            if _OPS[op](value, bound):
                return grade, (op, bound)
        return self.otherwise, None

    def decide(self, env: Env) -> tuple[str, Any]:
        value = self.value(env)
        grade, band = self.grade_for(value)
        return grade, (value, band)

    def explain(self, env: Env, trace: Any) -> list[str]:
        value, band = trace
        what = _cap(phrase(self.m, value, self.currency))
        if band is None:
            why = "value unknown" if value is None else "no band applies"
        else:
            why = f"{_SYMBOL[band[0]]} {show(self.m.kind, band[1], self.currency)}"
        return [f"{what} ({why}): grade {{grade}}."]


class Scorecard(_TotalBands):
    """A weighted scorecard: each factor's first matching point band, times its weight; total against bands."""

    banded = True

    def __init__(self, factors: tuple[tuple[str, MetricDef, float, tuple[tuple[tuple[Check, ...], float], ...], float], ...],
                 bands: tuple[tuple[float, str], ...], otherwise: str, currency: str) -> None:
        self.factors, self.bands, self.otherwise, self.currency = factors, bands, otherwise, currency

    def _points(self, values: dict, pop: Any) -> list[float]:
        out = []
        for _, m, weight, bands, otherwise in self.factors:
            value = values[m.name]
            points = otherwise
            for checks, p in bands:
                if _checks_hold(value, checks, m.name, pop):
                    points = p
                    break
            out.append(points * weight)
        return out

    def value(self, env: Env) -> float:
        return sum(self._points(env[0], env[2]))


    def explain(self, env: Env, trace: Any) -> list[str]:
        values, _, pop = env
        lines = []
        for (name, m, weight, _, _), pts in zip(self.factors, self._points(values, pop)):
            w = f" × {_num(weight)}" if weight != 1 else ""
            lines.append(f"{name}: {phrase(m, values[m.name], self.currency)} → {_num(pts / weight if weight else 0)}"
                         f" point{'s' if pts != weight else ''}{w} = {_num(pts)}.")
        total, floor = trace
        why = f"≥ {_num(floor)}" if floor is not None else "below every band"
        lines.append(f"Scorecard total {_num(total)} ({why}): grade {{grade}}.")
        return lines


class Rules(Decider):
    """First-match rules; a rule gives a grade or hands over to a nested decider (sub-grades)."""

    def __init__(self, rules: tuple[tuple[CompiledCond | None, str | Decider, str | None], ...], otherwise: str) -> None:
        self.rules, self.otherwise = rules, otherwise

    def decide(self, env: Env) -> tuple[str, Any]:
        values, _, pop = env
        for i, (cond, outcome, _) in enumerate(self.rules):
            if cond is None or cond.test(values, pop):
                if isinstance(outcome, str):
                    return outcome, (i, None)
                grade, sub = outcome.decide(env)
                return grade, (i, sub)
        return self.otherwise, (None, None)

    def explain(self, env: Env, trace: Any) -> list[str]:
        values, _, pop = env
        i, sub = trace
        if i is None:
            return ["No rule applies: grade {grade}."]
        cond, outcome, because = self.rules[i]
        label = f"Rule {i + 1}" + (f" ({because})" if because else "")
        held = "always applies" if cond is None else _cap(cond.words(values, pop))
        if isinstance(outcome, str):
            return [f"{label}: {held}: grade {{grade}}."]
        return [f"{label}: {held}."] + outcome.explain(env, sub)
