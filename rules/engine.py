"""Evaluate a compiled ruleset on one customer's state at a given time.

:func:`compile_ruleset` turns the validated model into plain tuples and
closures once (thresholds in the metric's unit, money in integer minor units),
so that :func:`evaluate` on the hot path only computes the metrics the ruleset
uses and compares numbers. Every decision can explain itself in sentences; the
sentences are only built when someone reads :attr:`Evaluation.reasons`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from rules import windows
from rules.metrics import MetricDef, getter, phrase, show
from rules.ruleset import Cond, Decide, Ruleset, convert, quantile_of
from rules.state import CustomerState, Tracking
from schemas.money import format_minor, major_to_minor

Population = Mapping[tuple[str, float], float]  # (metric, quantile) → threshold in the metric's unit
Env = tuple[dict[str, Any], dict[str, int], "Population | None"]  # values, scores, population thresholds

_NUMERIC = ("money", "days", "count", "number")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "ge": operator.ge, "lt": operator.lt,
    "le": operator.le, "in": lambda v, t: v in t, "not_in": lambda v, t: v not in t,
}
_SYMBOL = {"eq": "=", "ne": "≠", "gt": ">", "ge": "≥", "lt": "<", "le": "≤", "in": "in", "not_in": "not in"}


@dataclass(slots=True, frozen=True)
class CompiledScore:
    name: str
    metric: str
    rising: bool  # True: "min" bands (≥), False: "max" bands (≤)
    bands: tuple[tuple[int, int], ...]  # (bound, score); money bounds in minor units
    otherwise: int


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


def _unit(m: MetricDef, value: float) -> Any:
    return int(value) if m.kind in ("money", "days", "count") else value


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


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0")


# ---------------------------------------------------------------- the compiled ruleset


@dataclass(slots=True, frozen=True)
class CompiledLadder:
    name: str
    grades: tuple[str, ...]
    rank: dict[str, int]  # grade → position, 0 is best
    key: frozenset[str]
    summed: tuple[str, ...]  # scores summed (the sum decider), else ()
    bands: tuple[tuple[Any, str], ...]  # the top decider's bands, for reference
    otherwise: str
    decider: Decider = None  # type: ignore[assignment]
    metrics: tuple[str, ...] = ()  # metrics this ladder's grade depends on (the change's `values`)
    dwell_s: float | None = None
    margin: Any = None  # in the decider's unit (minor units for money)
    margin_words: str = ""
    quantiles: tuple[tuple[str, float], ...] = ()  # population thresholds this ladder compares against


@dataclass(slots=True, frozen=True)
class CompiledRuleset:
    id: str
    version: str
    tz: ZoneInfo
    currency: str
    window_days: int
    scores: tuple[CompiledScore, ...]
    ladders: tuple[CompiledLadder, ...]
    getters: tuple[tuple[str, Callable[..., Any]], ...] = ()  # metrics beyond the three legacy ones
    defs: Mapping[str, MetricDef] = None  # type: ignore[assignment]
    track: Tracking = Tracking()
    quantiles: tuple[tuple[str, float], ...] = ()  # population thresholds the ruleset compares against
    source: Ruleset | None = None
    legacy_used: bool = False  # the ruleset itself uses recency_days, frequency and monetary

    # Derived once here: the hot path reads them for every event.
    retention_days: int = field(init=False)
    key: str = field(init=False)  # "id@version"
    tracks_since: bool = field(init=False)  # a ladder has a minimum dwell time (needs when each grade was emitted)
    # (score name, value) → its reason sentence, for small integer values (see _sentence).
    sentences: dict[tuple[str, Any], str] = field(init=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "retention_days", self.track.retention_days)
        object.__setattr__(self, "key", f"{self.id}@{self.version}")
        object.__setattr__(self, "tracks_since", any(ladder.dwell_s is not None for ladder in self.ladders))
        object.__setattr__(self, "sentences", {})


class Evaluation:
    """Metrics, scores and one grade per ladder, with reasons, as of one instant.

    ``recency_days``, ``frequency`` and ``monetary_minor`` (the compatibility
    fields of every grade change) are computed on first access when the
    ruleset itself does not use them; ``reasons`` are built on first access
    (three events in four change no grade and never need them).
    """

    # The inputs of the lazy parts are kept as fields, not closures: a closure is two more
    # objects per evaluation, and every event is evaluated.
    __slots__ = ("_recency", "_frequency", "_monetary", "_filled", "scores", "grades", "values",
                 "_reasons", "_rs", "_state", "_as_of", "_bounds", "_traces", "_population")

    def __init__(self, recency_days: int | None, frequency: int, monetary_minor: int, scores: dict[str, int],
                 grades: dict[str, str], reasons: dict[str, list[str]] | None = None,
                 values: dict[str, Any] | None = None, rs: CompiledRuleset | None = None,
                 state: CustomerState | None = None, as_of: datetime | None = None,
                 bounds: dict[str, Any] | None = None, traces: dict[str, Any] | None = None,
                 population: Population | None = None, filled: bool = True) -> None:
        self._recency = recency_days
        self._frequency = frequency
        self._monetary = monetary_minor
        self._filled = filled
        self.scores = scores
        self.grades = grades
        self.values = values if values is not None else {}
        self._reasons = reasons
        self._rs = rs
        self._state = state
        self._as_of = as_of
        self._bounds = bounds
        self._traces = traces
        self._population = population

    def _fill(self) -> None:
        if not self._filled:
            rs, state, as_of = self._rs, self._state, self._as_of
            assert rs is not None and state is not None and as_of is not None
            self._recency, self._frequency, self._monetary = _legacy(rs, state, as_of)
            self._filled = True

    @property
    def recency_days(self) -> int | None:
        self._fill()
        return self._recency

    @property
    def frequency(self) -> int:
        self._fill()
        return self._frequency

    @property
    def monetary_minor(self) -> int:
        self._fill()
        return self._monetary

    @property
    def reasons(self) -> dict[str, list[str]]:
        """Per ladder, the sentences that explain its grade (built on first access)."""
        if self._reasons is None:
            rs, bounds, traces = self._rs, self._bounds, self._traces
            self._reasons = ({} if rs is None or bounds is None or traces is None
                             else _explain(rs, self.values, self.scores, bounds, traces, self._population))
        return self._reasons

    @property
    def code(self) -> str:
        return "".join(map(str, self.scores.values()))

    def __repr__(self) -> str:
        return f"Evaluation(grades={self.grades}, scores={self.scores}, values={self.values})"


def _convert_bound(m: MetricDef, bound: Any, currency: str) -> Any:
    return convert(m.kind, bound, currency)


def compile_ruleset(ruleset: Ruleset) -> CompiledRuleset:
    """Prepare a validated ruleset for fast evaluation."""
    used: set[str] = set()
    quantiles: set[tuple[str, float]] = set()
    score_metrics: dict[str, str] = {}
    scores = []
    for name, score in ruleset.scores.items():
        m = ruleset.metric(score.metric)
        used.add(m.name)
        score_metrics[name] = m.name
        rising = score.bands[0].min is not None
        bands = []
        for band in score.bands:
            bound = band.min if rising else band.max
            assert bound is not None
            bands.append((_convert_bound(m, bound, ruleset.currency), band.score))
        scores.append(CompiledScore(name, m.name, rising, tuple(bands), score.otherwise))

    def build(d: Decide, ladder_used: set[str]) -> Decider:
        if d.sum is not None:
            ladder_used.update(score_metrics[s] for s in d.sum)
            return SumBands(tuple(d.sum), tuple((int(b.bound), b.grade) for b in d.bands or ()), d.otherwise)
        if d.metric is not None:
            m = ruleset.metric(d.metric)
            ladder_used.add(m.name)
            bands = tuple((b.op, _convert_bound(m, b.bound, ruleset.currency), b.grade) for b in d.bands or ())
            return MetricBands(m, bands, d.otherwise, ruleset.currency)
        if d.scorecard is not None:
            factors = []
            for name, f in d.scorecard.items():
                m = ruleset.metric(f.metric)
                ladder_used.add(m.name)
                pbands = tuple((compile_checks(ruleset, m, pb), float(pb.points)) for pb in f.points)
                for checks, _ in pbands:
                    quantiles.update((m.name, c.q) for c in checks if c.q is not None)
                factors.append((f.description or name, m, float(f.weight), pbands, float(f.otherwise)))
            return Scorecard(tuple(factors), tuple((float(b.bound), b.grade) for b in d.bands or ()), d.otherwise,
                             ruleset.currency)
        rules = []
        for r in d.rules or ():
            cond = compile_cond(ruleset, r.when, ladder_used, quantiles) if r.when is not None else None
            outcome: str | Decider = r.grade if r.grade is not None else build(r.then, ladder_used)  # type: ignore[arg-type]
            rules.append((cond, outcome, r.because))
        return Rules(tuple(rules), d.otherwise)

    ladders = []
    for name, ladder in ruleset.ladders.items():
        ladder_used: set[str] = set()
        earlier = set(quantiles)
        quantiles.clear()
        decider = build(ladder.decide, ladder_used)
        ladder_quantiles = tuple(sorted(quantiles))
        quantiles.update(earlier)
        used.update(ladder_used)
        dwell_s: float | None = None
        margin: int | float | None = None
        margin_words = ""
        if ladder.hysteresis is not None:
            h = ladder.hysteresis
            dwell_s = float(h.min_dwell_days) * 86400 if h.min_dwell_days is not None else None
            if h.margin is not None:
                if isinstance(decider, MetricBands) and decider.m.kind == "money":
                    margin = major_to_minor(h.margin, ruleset.currency)
                    margin_words = show("money", margin, ruleset.currency)
                else:
                    number = float(h.margin)
                    margin, margin_words = number, _num(number)
        d = ladder.decide
        ladders.append(CompiledLadder(
            name=name,
            grades=tuple(ladder.grades),
            rank={g: i for i, g in enumerate(ladder.grades)},
            key=frozenset(ladder.key),
            summed=tuple(d.sum or ()),
            bands=tuple((b.bound, b.grade) for b in d.bands or ()),
            otherwise=d.otherwise,
            decider=decider,
            metrics=tuple(sorted(ladder_used)),
            dwell_s=dwell_s,
            margin=margin,
            margin_words=margin_words,
            quantiles=ladder_quantiles,
        ))
    tz = ZoneInfo(ruleset.timezone)
    defs = {n: ruleset.metric(n) for n in used | {"recency_days", "frequency", "monetary"}}
    getters = tuple((n, getter(defs[n], tz)) for n in sorted(used))
    retention = max([ruleset.window_days] + [m.retention for m in defs.values()])
    track = Tracking(
        detail=any(m.needs_detail for m in defs.values()),
        interaction_days=any(m.needs_interaction_days for m in defs.values()),
        attributes=tuple(sorted(ruleset.attributes.items())),
        retention_days=retention,
    )
    return CompiledRuleset(
        ruleset.id, ruleset.version, tz, ruleset.currency, ruleset.window_days, tuple(scores), tuple(ladders),
        getters=getters, defs=defs, track=track, quantiles=tuple(sorted(quantiles)), source=ruleset,
        legacy_used=all(n in used for n in ("recency_days", "frequency", "monetary")),
    )


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


_LEGACY = ("recency_days", "frequency", "monetary")


def metric_values(rs: CompiledRuleset, state: CustomerState, as_of: datetime,
                  as_of_ts: float | None = None) -> dict[str, Any]:
    """Every metric the ruleset uses, as of ``as_of`` (money in minor units).

    ``as_of_ts`` is ``as_of.timestamp()`` when the caller has it (it costs most of a microsecond)."""
    ts = as_of.timestamp() if as_of_ts is None else as_of_ts
    as_of_day = windows.day_of_ts(ts, rs.tz)
    cache: dict[Any, Any] = {}
    return {name: get(state, as_of_day, ts, cache) for name, get in rs.getters}


def _legacy(rs: CompiledRuleset, state: CustomerState, as_of: datetime) -> tuple[int | None, int, int]:
    as_of_day = windows.local_day(as_of, rs.tz)
    recency: int | None = None
    if state.last_purchase_ts is not None:
        recency = max(0, as_of_day - windows.day_of_ts(state.last_purchase_ts, rs.tz))
    frequency, net = windows.totals(state.buckets, as_of_day, rs.window_days)
    return recency, frequency, net


def evaluate(rs: CompiledRuleset, state: CustomerState, as_of: datetime, population: Population | None = None,
             hysteresis: bool = True, as_of_ts: float | None = None) -> Evaluation:
    """Grade ``state`` on every ladder of ``rs`` as of the aware datetime ``as_of``.

    ``population`` holds the thresholds of relative comparisons (see
    rules/population.py); without it they do not hold. ``hysteresis`` applies
    each ladder's dwell time and margin against the grade last emitted
    (``state.grades``); a ruleset change re-grades without it. ``as_of_ts``:
    ``as_of.timestamp()``, when the caller has it.
    """
    values = metric_values(rs, state, as_of, as_of_ts)
    scores: dict[str, int] = {}
    bounds: dict[str, Any] = {}
    for score in rs.scores:
        points, bound = _score(score, values[score.metric])
        scores[score.name] = points
        bounds[score.name] = bound
    env: Env = (values, scores, population)
    grades: dict[str, str] = {}
    traces: dict[str, Any] = {}
    for ladder in rs.ladders:
        decided, trace = ladder.decider.decide(env)
        grade, held = decided, None
        if hysteresis and (ladder.dwell_s is not None or ladder.margin is not None):
            grade, held = _hysteresis(ladder, state, as_of, grade, env)
        grades[ladder.name] = grade
        traces[ladder.name] = (trace, held, decided)

    if rs.legacy_used:
        return Evaluation(values["recency_days"], values["frequency"], values["monetary"], scores, grades,
                          values=values, rs=rs, bounds=bounds, traces=traces, population=population)
    return Evaluation(None, 0, 0, scores, grades, values=values, rs=rs, state=state, as_of=as_of, bounds=bounds,
                      traces=traces, population=population, filled=False)


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


def _hysteresis(ladder: CompiledLadder, state: CustomerState, as_of: datetime, grade: str, env: Env) -> tuple[str, str | None]:
    """The grade after the ladder's dwell time and margin, and a sentence when they held it."""
    previous = state.grades.get(ladder.name)
    if previous is None or previous == grade or previous not in ladder.rank:
        return grade, None
    if ladder.dwell_s is not None:
        since = state.grade_since.get(ladder.name)
        if since is not None and as_of.timestamp() - since < ladder.dwell_s:
            days = ladder.dwell_s / 86400
            return previous, (f"Held at {previous} (hysteresis): a grade stays at least {_num(days)} "
                              f"day{'s' if days != 1 else ''}; it would otherwise be {grade}.")
    decider = ladder.decider
    if ladder.margin is not None and decider.banded:
        value = decider.value(env)  # type: ignore[attr-defined]
        if value is not None:
            better = ladder.rank[grade] < ladder.rank[previous]
            # Move the value back toward the previous grade by the margin and decide again.
            toward_previous = -1 if better == decider.rising else 1
            moved, _ = decider.grade_for(value + toward_previous * ladder.margin)  # type: ignore[attr-defined]
            if moved == previous:
                return previous, (f"Held at {previous} (hysteresis): the value is within the margin of "
                                  f"{ladder.margin_words} of the band's bound; it would otherwise be {grade}.")
            return moved, None
    return grade, None
