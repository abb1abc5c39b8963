"""Rule files: YAML validated by pydantic, refused with file, path and line.

A ruleset names its time zone, currency, default rolling window, the
attributes of interactions it reads, the scores it computes from metrics
(ordered bands) and one or more ladders. Each ladder names its grades (best
first), its key grades, optional hysteresis, and how a grade is decided: by
the sum of scores, by ordered bands on one metric, by first-match rules over
conditions (all / any / not and comparisons, with nested deciders for
sub-grades), by a weighted scorecard, or relative to the population (a
comparison against a population quantile). No code and no ``eval`` come from
the file. See rules/README.md for the format.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from rules.metrics import MetricDef, MetricError, parse_metric
from schemas.errors import RulesetError
from schemas.events import INTERACTION_TYPES
from schemas.money import CURRENCY_EXPONENTS, major_to_minor

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_RULESET = "rfm-5"

Metric = str  # a metric name of the catalogue (rules/metrics.py)
Loc = tuple[str | int, ...]
COMPARISONS = ("eq", "ne", "gt", "ge", "lt", "le")
ORDERED = ("gt", "ge", "lt", "le")


def _problems(title: str, found: list[tuple[Loc, str, Any]]) -> ValidationError:
    """A validation error for each ``(loc, message, input)``, so that a problem found by a
    model validator is reported at the field it is about (and its line), not at the model."""
    return ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError("ruleset", "{problem}", {"problem": message}), loc=loc, input=value)
        for loc, message, value in found
    ])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Band(_Strict):
    """One band: ``max`` (value ≤ max) for falling metrics, ``min`` (value ≥ min) for rising ones."""

    min: Decimal | None = None
    max: Decimal | None = None
    score: int = Field(ge=0, le=100)

    @model_validator(mode="after")
    def _one_bound(self) -> "Band":
        if (self.min is None) == (self.max is None):
            raise ValueError("a band has exactly one of 'min' or 'max'")
        return self


class Score(_Strict):
    """A score from one metric by ordered bands; the first band that matches wins."""

    metric: Metric
    bands: list[Band] = Field(min_length=1)
    otherwise: int = Field(alias="else", ge=0, le=100)

    @model_validator(mode="after")
    def _ordered(self) -> "Score":
        kinds = {"min" if b.min is not None else "max" for b in self.bands}
        if len(kinds) > 1:
            raise ValueError("bands of one score must all use 'min' or all use 'max'")
        bounds = [b.min if b.min is not None else b.max for b in self.bands]
        for i in range(1, len(bounds)):
            if kinds == {"min"} and bounds[i] > bounds[i - 1]:  # type: ignore[operator]
                raise _problems("Score", [(("bands", i, "min"), "'min' bands must be listed from the highest bound down",
                                           bounds[i])])
            if kinds == {"max"} and bounds[i] < bounds[i - 1]:  # type: ignore[operator]
                raise _problems("Score", [(("bands", i, "max"), "'max' bands must be listed from the lowest bound up",
                                           bounds[i])])
        return self


class GradeBand(_Strict):
    """A grade when the value is ``min`` (≥), ``above`` (>), ``max`` (≤) or ``below`` (<) a bound."""

    min: Decimal | None = None
    above: Decimal | None = None
    max: Decimal | None = None
    below: Decimal | None = None
    grade: str

    @model_validator(mode="after")
    def _one_bound(self) -> "GradeBand":
        if sum(v is not None for v in (self.min, self.above, self.max, self.below)) != 1:
            raise ValueError("a band has exactly one of 'min', 'above', 'max' or 'below'")
        return self

    @property
    def op(self) -> str:
        return "ge" if self.min is not None else "gt" if self.above is not None else "le" if self.max is not None else "lt"

    @property
    def op_key(self) -> str:
        return {"ge": "min", "gt": "above", "le": "max", "lt": "below"}[self.op]

    @property
    def bound(self) -> Decimal:
        value = next(v for v in (self.min, self.above, self.max, self.below) if v is not None)
        return value


class _Ops(_Strict):
    """Comparisons of one value; all that are given must hold."""

    eq: Any = None
    ne: Any = None
    gt: Any = None
    ge: Any = None
    lt: Any = None
    le: Any = None
    in_: list[Any] | None = Field(None, alias="in")
    not_in: list[Any] | None = None
    exists: bool | None = None

    def ops(self) -> list[tuple[str, Any]]:
        found = [(op, getattr(self, op)) for op in COMPARISONS if getattr(self, op) is not None]
        if self.in_ is not None:
            found.append(("in", self.in_))
        if self.not_in is not None:
            found.append(("not_in", self.not_in))
        if self.exists is not None:
            found.append(("exists", self.exists))
        return found


class Cond(_Ops):
    """A condition: ``all`` / ``any`` of conditions, ``not`` a condition, or comparisons of a metric.

    ``top_percent: p`` holds when the metric is at or above the population's
    ``(100 − p)``th percentile; any ordered comparison may also take
    ``{quantile: q}`` instead of a number.
    """

    all: list["Cond"] | None = None
    any: list["Cond"] | None = None
    not_: "Cond | None" = Field(None, alias="not")
    metric: Metric | None = None
    top_percent: Decimal | None = Field(None, gt=0, lt=100)

    @model_validator(mode="after")
    def _one_kind(self) -> "Cond":
        kinds = [k for k, v in (("all", self.all), ("any", self.any), ("not", self.not_), ("metric", self.metric))
                 if v is not None]
        if len(kinds) != 1:
            raise ValueError("a condition has exactly one of 'all', 'any', 'not' or 'metric' (with comparisons)")
        if self.metric is not None and not self.ops() and self.top_percent is None:
            raise ValueError(f"condition on {self.metric!r} compares nothing; use eq, ne, gt, ge, lt, le, in, "
                             "not_in, exists or top_percent")
        if self.metric is None and (self.ops() or self.top_percent is not None):
            raise ValueError("comparisons need a 'metric'")
        if self.all is not None and not self.all or self.any is not None and not self.any:
            raise ValueError("'all' and 'any' need at least one condition")
        return self


class Rule(_Strict):
    """First-match rule: when the condition holds (or always, without ``when``), the grade or a nested decider."""

    when: Cond | None = None
    grade: str | None = None
    then: "Decide | None" = None
    because: str | None = Field(None, description="Why, in words, for reasons.")

    @model_validator(mode="after")
    def _one_outcome(self) -> "Rule":
        if (self.grade is None) == (self.then is None):
            raise ValueError("a rule has exactly one of 'grade' or 'then' (a nested decider for sub-grades)")
        return self


class PointBand(_Ops):
    """Points of a scorecard factor when its comparisons hold."""

    points: Decimal


class Factor(_Strict):
    """One factor of a scorecard: the first matching point band gives points, times the weight."""

    metric: Metric
    weight: Decimal = Field(Decimal(1), ge=0)
    points: list[PointBand] = Field(min_length=1)
    otherwise: Decimal = Field(Decimal(0), alias="else")
    description: str | None = None


class Decide(_Strict):
    """How a ladder (or a rule's sub-grades) decides; exactly one of ``sum``, ``metric``, ``rules``, ``scorecard``."""

    sum: list[str] | None = Field(None, min_length=1)
    metric: Metric | None = None
    scorecard: dict[str, Factor] | None = Field(None, min_length=1)
    rules: list[Rule] | None = Field(None, min_length=1)
    bands: list[GradeBand] | None = Field(None, min_length=1)
    otherwise: str = Field(alias="else")

    @model_validator(mode="after")
    def _one_way(self) -> "Decide":
        ways = [w for w in ("sum", "metric", "scorecard", "rules") if getattr(self, w) is not None]
        if len(ways) != 1:
            raise ValueError("decide with exactly one of 'sum' (of scores), 'metric' (bands on one metric), "
                             f"'scorecard' or 'rules'; got {ways or 'none'}")
        way = ways[0]
        if way == "rules":
            if self.bands is not None:
                raise _problems("Decide", [(("bands",), "'rules' decide by their own grades; remove 'bands'", None)])
            return self
        if self.bands is None:
            raise _problems("Decide", [(("bands",), f"'{way}' needs 'bands'", None)])
        ops = [b.op for b in self.bands]
        bounds = [b.bound for b in self.bands]
        if way in ("sum", "scorecard"):
            for i, b in enumerate(self.bands):
                if b.min is None:
                    raise _problems("Decide", [(("bands", i), f"bands of a {way} use 'min' (points ≥ min)", None)])
            if bounds != sorted(bounds, reverse=True):
                raise _problems("Decide", [(("bands",), "grade bands must be listed from the highest 'min' down",
                                            [str(b) for b in bounds])])
            return self
        rising = {op in ("ge", "gt") for op in ops}
        if len(rising) > 1:
            raise _problems("Decide", [(("bands",), "bands of one metric all use min/above (higher is better) "
                                        "or all use max/below (lower is better)", None)])
        for i in range(1, len(bounds)):
            if rising == {True} and bounds[i] > bounds[i - 1]:
                raise _problems("Decide", [(("bands", i), "min/above bands must be listed from the highest bound down",
                                            str(bounds[i]))])
            if rising == {False} and bounds[i] < bounds[i - 1]:
                raise _problems("Decide", [(("bands", i), "max/below bands must be listed from the lowest bound up",
                                            str(bounds[i]))])
        return self

    def grades(self) -> list[tuple[Loc, str]]:
        """Every grade this decider can name, with where it is named."""
        found: list[tuple[Loc, str]] = []
        for i, band in enumerate(self.bands or ()):
            found.append((("bands", i, "grade"), band.grade))
        for i, rule in enumerate(self.rules or ()):
            if rule.grade is not None:
                found.append((("rules", i, "grade"), rule.grade))
            elif rule.then is not None:
                found.extend((("rules", i, "then", *loc), g) for loc, g in rule.then.grades())
        found.append((("else",), self.otherwise))
        return found


class Hysteresis(_Strict):
    """Against flapping: a minimum time on a grade, and/or a margin to cross beyond a band's bound."""

    min_dwell_days: Decimal | None = Field(None, ge=0)
    margin: Decimal | None = Field(None, gt=0, description="In the decider's units: money in major units, points, days.")


class Regrade(_Strict):
    """A scheduled re-grade: the clock re-grades the ladder at every month end or year end (in the
    ruleset's time zone), and only then; its own events still re-grade it at once (rules/README.md)."""

    every: Literal["month_end", "year_end"]


class Ladder(_Strict):
    """A ladder of grades, best first, with its key grades and how a grade is decided."""

    description: str | None = None
    grades: list[str] = Field(min_length=2)
    key: list[str] = Field(default_factory=list)
    decide: Decide
    hysteresis: Hysteresis | None = None
    regrade: Regrade | None = None

    @model_validator(mode="after")
    def _known_grades(self) -> "Ladder":
        if len(set(self.grades)) != len(self.grades):
            raise ValueError("grades must be unique")
        if "none" in self.grades:
            # The grade an id merged into another ends with (rules/merge.py, docs/customers.md).
            raise ValueError("'none' is reserved (the grade of a customer id merged into another): name it otherwise")
        known = set(self.grades)
        found: list[tuple[Loc, str, Any]] = []
        for i, name in enumerate(self.key):
            if name not in known:
                found.append((("key", i), f"key grade {name!r} is not one of the ladder's grades {self.grades}", name))
        for loc, grade in self.decide.grades():
            if grade not in known:
                what = "else grade" if loc[-1] == "else" else "band grade" if "bands" in loc else "rule grade"
                found.append((("decide", *loc), f"{what} {grade!r} is not one of the ladder's grades {self.grades}",
                              grade))
        if found:
            raise _problems("Ladder", found)
        return self


class Ruleset(_Strict):
    """A whole rule file."""

    id: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str = Field(min_length=1)
    description: str | None = None
    timezone: str = "Asia/Shanghai"
    currency: str = "CNY"
    window_days: int = Field(default=365, ge=1, le=3660)
    attributes: dict[str, Literal["number", "text", "bool", "date"]] = Field(
        default_factory=dict, description="Interaction attributes the rules read, with their kinds.")
    scores: dict[str, Score] = Field(default_factory=dict)
    ladders: dict[str, Ladder] = Field(min_length=1)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        if value not in CURRENCY_EXPONENTS:
            raise ValueError(f"currency {value!r} is not a supported ISO 4217 code")
        return value

    @model_validator(mode="after")
    def _known_names(self) -> "Ruleset":
        found = check(self)
        if found:
            raise _problems("Ruleset", found)
        return self

    def metric(self, name: str) -> MetricDef:
        """The parsed metric ``name`` (it was checked at load)."""
        return parse_metric(name, self.window_days, self.attributes, INTERACTION_TYPES)  # type: ignore[arg-type]


Cond.model_rebuild()
Rule.model_rebuild()
Decide.model_rebuild()


# ---------------------------------------------------------------- cross-checks


def convert(kind: str, raw: Any, currency: str) -> Any:
    """A threshold from the file as the metric's unit: minor units for money, int for days and counts."""
    if kind in ("money", "days", "count", "number"):
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str, Decimal)):
            raise ValueError(f"{raw!r} is not a number")
        try:
            value = Decimal(str(raw))
        except InvalidOperation:
            raise ValueError(f"{raw!r} is not a number") from None
        if not value.is_finite():
            raise ValueError(f"{raw!r} is not a finite number")
        if kind == "money":
            try:
                return major_to_minor(value, currency)
            except ValueError:
                raise ValueError(f"{raw} has more decimals than {currency} allows") from None
        if kind in ("days", "count"):
            if value != value.to_integral_value():
                raise ValueError(f"{raw} must be a whole number of {kind}")
            return int(value)
        return float(value)
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ValueError(f"{raw!r} is not true or false")
        return raw
    if kind == "text":
        if isinstance(raw, (dict, list)):
            raise ValueError(f"{raw!r} is not a text value")
        if isinstance(raw, bool):
            return "true" if raw else "false"
        return str(raw)
    raise ValueError(f"a {kind} attribute can only be tested with 'exists'; use days_until.<name> or days_since.<name>")


def quantile_of(raw: Any) -> float | None:
    """``q`` of a ``{quantile: q}`` threshold, or None when ``raw`` is a plain value."""
    if isinstance(raw, dict):
        if set(raw) != {"quantile"}:
            raise ValueError(f"a population threshold is written {{quantile: q}} with 0 < q < 1, got {raw!r}")
        q = raw["quantile"]
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 1:
            raise ValueError(f"quantile must be a number strictly between 0 and 1, got {q!r}")
        return float(q)
    return None


def check(rs: Ruleset) -> list[tuple[Loc, str, Any]]:
    """Every unknown metric, window, attribute, score or unusable threshold, with where it is."""
    found: list[tuple[Loc, str, Any]] = []

    def metric(loc: Loc, name: str) -> MetricDef | None:
        try:
            return rs.metric(name)
        except MetricError as exc:
            found.append((loc, str(exc), name))
            return None

    def ops(loc: Loc, m: MetricDef, node: _Ops) -> None:
        for op, raw in node.ops():
            at = (*loc, op)
            try:
                if op == "exists":
                    continue
                if op in ("in", "not_in"):
                    for i, item in enumerate(raw):
                        try:
                            convert(m.kind, item, rs.currency)
                        except ValueError as exc:
                            found.append(((*at, i), f"{m.name}: {exc}", item))
                    continue
                q = quantile_of(raw)
                if q is not None:
                    if op not in ORDERED or m.kind not in ("money", "days", "count", "number"):
                        raise ValueError("a {quantile: q} threshold needs a numeric metric and gt, ge, lt or le")
                    continue
                if m.kind not in ("money", "days", "count", "number") and op in ORDERED:
                    raise ValueError(f"{m.name} is {m.kind}: it has no order; use eq, ne, in, not_in or exists")
                convert(m.kind, raw, rs.currency)
            except ValueError as exc:
                found.append((at, f"{m.name}: {exc}", raw))

    def cond(loc: Loc, c: Cond) -> None:
        for key, items in (("all", c.all), ("any", c.any)):
            for i, sub in enumerate(items or ()):
                cond((*loc, key, i), sub)
        if c.not_ is not None:
            cond((*loc, "not"), c.not_)
        if c.metric is not None:
            m = metric((*loc, "metric"), c.metric)
            if m is not None:
                ops(loc, m, c)
                if c.top_percent is not None and m.kind not in ("money", "days", "count", "number"):
                    found.append(((*loc, "top_percent"), f"{m.name} is {m.kind}: top_percent needs a numeric metric",
                                  str(c.top_percent)))

    def decide(loc: Loc, d: Decide, ladder: str) -> None:
        for i, score in enumerate(d.sum or ()):
            if score not in rs.scores:
                found.append(((*loc, "sum", i), f"ladder {ladder!r} sums unknown score {score!r}; "
                               f"known: {sorted(rs.scores)}", score))
        if d.metric is not None:
            m = metric((*loc, "metric"), d.metric)
            if m is not None:
                if m.kind not in ("money", "days", "count", "number"):
                    found.append(((*loc, "metric"), f"bands need a numeric metric; {m.name} is {m.kind}", d.metric))
                else:
                    for i, band in enumerate(d.bands or ()):
                        try:
                            convert(m.kind, band.bound, rs.currency)
                        except ValueError as exc:
                            found.append(((*loc, "bands", i, band.op_key), f"{m.name}: {exc}", str(band.bound)))
        for name, factor in (d.scorecard or {}).items():
            m = metric((*loc, "scorecard", name, "metric"), factor.metric)
            if m is not None:
                for i, point in enumerate(factor.points):
                    ops((*loc, "scorecard", name, "points", i), m, point)
        for i, rule in enumerate(d.rules or ()):
            if rule.when is not None:
                cond((*loc, "rules", i, "when"), rule.when)
            if rule.then is not None:
                decide((*loc, "rules", i, "then"), rule.then, ladder)

    for name, score in rs.scores.items():
        m = metric(("scores", name, "metric"), score.metric)
        if m is not None:
            if m.kind not in ("money", "days", "count", "number"):
                found.append((("scores", name, "metric"), f"scores need a numeric metric; {m.name} is {m.kind}",
                              score.metric))
                continue
            for i, band in enumerate(score.bands):
                bound = band.min if band.min is not None else band.max
                try:
                    convert(m.kind, bound, rs.currency)
                except ValueError as exc:
                    found.append((("scores", name, "bands", i, "min" if band.min is not None else "max"),
                                  f"{m.name}: {exc}", str(bound)))
    for name, ladder in rs.ladders.items():
        decide(("ladders", name, "decide"), ladder.decide, name)
        h = ladder.hysteresis
        if h is not None and h.margin is not None and ladder.decide.rules is not None:
            found.append((("ladders", name, "hysteresis", "margin"),
                          "a margin needs a decider with bands (sum, metric or scorecard); "
                          "for rules use min_dwell_days", str(h.margin)))
    return found


def resolve(name_or_path: str | Path) -> Path:
    """A preset name (``rfm-5``) or a file path, as a path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate
    return PRESETS_DIR / f"{name_or_path}.yaml"


def load(name_or_path: str | Path) -> Ruleset:
    """Read and validate a rule file; raise :class:`RulesetError` naming file, path and line."""
    path = resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        presets = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise RulesetError(str(path), [f"cannot read the file ({exc.strerror}); presets: {presets}"]) from None
    return parse(text, str(path))


def parse(text: str, source: str = "<string>") -> Ruleset:
    """Validate rule-file text; ``source`` names it in errors."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise RulesetError(source, [f"{where}not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if not isinstance(doc, dict):
        raise RulesetError(source, ["the file must be a YAML mapping (id, version, scores, ladders, ...)"])
    try:
        return Ruleset.model_validate(doc)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            line = _line_of(root, loc)
            where = ".".join(loc) or "(top)"
            at = f" (line {line})" if line else ""
            problems.append(f"{where}{at}: {err['msg']}")
        raise RulesetError(source, problems) from None


def _line_of(node: Any, loc: list[str]) -> int | None:
    """Line (1-based) of the YAML node at ``loc``, or of its nearest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if str(k.value) == part), None)
            # The key's line: a block mapping value starts on the line after it.
            child, mark = (pair[1], pair[0].start_mark) if pair is not None else (None, None)
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            child = node.value[int(part)]
            mark = child.start_mark
        else:
            child = None
        if child is None:
            break
        node = child
        line = mark.line + 1  # type: ignore[union-attr]
    return line
