"""Evaluate a compiled ruleset on one customer's state at a given time.

:func:`compile_ruleset` turns the validated model into tuples of integers
(money in minor units) once, so that :func:`evaluate` on the hot path does
only integer comparisons. Every decision carries the sentences that explain it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from rules import windows
from rules.ruleset import Ruleset
from rules.state import CustomerState
from schemas.money import format_minor, major_to_minor


@dataclass(slots=True, frozen=True)
class CompiledScore:
    name: str
    metric: str
    rising: bool  # True: "min" bands (≥), False: "max" bands (≤)
    bands: tuple[tuple[int, int], ...]  # (bound, score); money bounds in minor units
    otherwise: int


@dataclass(slots=True, frozen=True)
class CompiledLadder:
    name: str
    grades: tuple[str, ...]
    rank: dict[str, int]  # grade → position, 0 is best
    key: frozenset[str]
    summed: tuple[str, ...]
    bands: tuple[tuple[int, str], ...]
    otherwise: str


@dataclass(slots=True, frozen=True)
class CompiledRuleset:
    id: str
    version: str
    tz: ZoneInfo
    currency: str
    window_days: int
    scores: tuple[CompiledScore, ...]
    ladders: tuple[CompiledLadder, ...]


@dataclass(slots=True)
class Evaluation:
    """Metrics, scores and one grade per ladder, with reasons, as of one instant."""

    recency_days: int | None
    frequency: int
    monetary_minor: int
    scores: dict[str, int]
    grades: dict[str, str]
    reasons: dict[str, list[str]]

    @property
    def code(self) -> str:
        return "".join(str(s) for s in self.scores.values())


def compile_ruleset(ruleset: Ruleset) -> CompiledRuleset:
    """Prepare a validated ruleset for fast evaluation."""
    scores = []
    for name, score in ruleset.scores.items():
        rising = score.bands[0].min is not None
        bands = []
        for band in score.bands:
            bound = band.min if rising else band.max
            assert bound is not None
            if score.metric == "monetary":
                value = major_to_minor(bound, ruleset.currency)
            else:
                value = int(bound)
            bands.append((value, band.score))
        scores.append(CompiledScore(name, score.metric, rising, tuple(bands), score.otherwise))
    ladders = []
    for name, ladder in ruleset.ladders.items():
        ladders.append(CompiledLadder(
            name=name,
            grades=tuple(ladder.grades),
            rank={g: i for i, g in enumerate(ladder.grades)},
            key=frozenset(ladder.key),
            summed=tuple(ladder.decide.sum),
            bands=tuple((b.min, b.grade) for b in ladder.decide.bands),
            otherwise=ladder.decide.otherwise,
        ))
    return CompiledRuleset(
        ruleset.id, ruleset.version, ZoneInfo(ruleset.timezone), ruleset.currency,
        ruleset.window_days, tuple(scores), tuple(ladders),
    )


def _score(score: CompiledScore, value: int | None) -> tuple[int, int | None]:
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


def _metric_sentence(rs: CompiledRuleset, score: CompiledScore, value: int | None, points: int, bound: int | None) -> str:
    cmp = "≥" if score.rising else "≤"
    if score.metric == "monetary":
        shown = f"net spend {format_minor(value or 0, rs.currency)} {rs.currency} in the last {rs.window_days} days"
        limit = None if bound is None else f"{format_minor(bound, rs.currency)} {rs.currency}"
    elif score.metric == "frequency":
        shown = f"{value} purchase{'s' if value != 1 else ''} in the last {rs.window_days} days"
        limit = None if bound is None else str(bound)
    else:
        shown = "no purchase yet" if value is None else f"last purchase {value} day{'s' if value != 1 else ''} ago"
        limit = None if bound is None else f"{bound} days"
    band = f"{cmp} {limit}" if limit is not None else "below every band"
    return f"{shown[0].upper()}{shown[1:]} ({band}): {score.name.upper()}={points}."


def evaluate(rs: CompiledRuleset, state: CustomerState, as_of: datetime) -> Evaluation:
    """Grade ``state`` on every ladder of ``rs`` as of the aware datetime ``as_of``."""
    as_of_day = windows.local_day(as_of, rs.tz)
    recency: int | None = None
    if state.last_purchase_ts is not None:
        last_day = datetime.fromtimestamp(state.last_purchase_ts, rs.tz).toordinal()
        recency = max(0, as_of_day - last_day)
    frequency, net = windows.totals(state.buckets, as_of_day, rs.window_days)
    values = {"recency_days": recency, "frequency": frequency, "monetary": net}
    scores: dict[str, int] = {}
    sentences: dict[str, str] = {}
    for score in rs.scores:
        value = values[score.metric]
        points, bound = _score(score, value)
        scores[score.name] = points
        sentences[score.name] = _metric_sentence(rs, score, value, points, bound)
    grades: dict[str, str] = {}
    reasons: dict[str, list[str]] = {}
    for ladder in rs.ladders:
        total = sum(scores[name] for name in ladder.summed)
        grade, floor = ladder.otherwise, None
        for minimum, band_grade in ladder.bands:
            if total >= minimum:
                grade, floor = band_grade, minimum
                break
        label = "+".join(n.upper() for n in ladder.summed)
        why = f"≥ {floor}" if floor is not None else "below every band"
        grades[ladder.name] = grade
        reasons[ladder.name] = [sentences[n] for n in ladder.summed] + [f"{label} = {total} ({why}): grade {grade}."]
    return Evaluation(recency, frequency, net, scores, grades, reasons)
