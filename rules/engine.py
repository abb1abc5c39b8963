"""Evaluate a compiled ruleset on one customer's state at a given time.

:func:`compile_ruleset` turns the validated model into plain tuples and
closures once (thresholds in the metric's unit, money in integer minor units),
so that :func:`evaluate` on the hot path only computes the metrics the ruleset
uses and compares numbers. The scores and deciders it compiles are in rules/deciders.py; every
decision can explain itself in sentences (rules/explain.py), built only when someone reads
:attr:`Evaluation.reasons`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from rules import windows
from rules.deciders import (CompiledScore, Decider, Env, MetricBands, Population, Rules, Scorecard, SumBands, _score,
                            compile_checks, compile_cond)
from rules.explain import _explain, _num
from rules.metrics import MetricDef, getter, show
from rules.ruleset import Decide, Ruleset, convert
from rules.state import CustomerState, Tracking
from schemas.money import major_to_minor


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
