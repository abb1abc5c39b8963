"""Rule files: YAML validated by pydantic, refused with file, path and line.

A ruleset names its time zone, currency, rolling window, the scores it
computes from metrics (ordered bands) and one or more ladders, each deciding a
grade from the scores. No code and no ``eval`` come from the file. See
rules/README.md for the format.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from schemas.errors import RulesetError
from schemas.money import CURRENCY_EXPONENTS

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_RULESET = "rfm-5"

Metric = Literal["recency_days", "frequency", "monetary"]


def _problems(title: str, found: list[tuple[tuple[str | int, ...], str, Any]]) -> ValidationError:
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
            if kinds == {"min"} and bounds[i] > bounds[i - 1]:
                raise _problems("Score", [(("bands", i, "min"), "'min' bands must be listed from the highest bound down",
                                           bounds[i])])
            if kinds == {"max"} and bounds[i] < bounds[i - 1]:
                raise _problems("Score", [(("bands", i, "max"), "'max' bands must be listed from the lowest bound up",
                                           bounds[i])])
        return self


class GradeBand(_Strict):
    min: int
    grade: str


class ScoreBands(_Strict):
    """Grade by the sum of some scores against ordered ``min`` bands."""

    sum: list[str] = Field(min_length=1)
    bands: list[GradeBand] = Field(min_length=1)
    otherwise: str = Field(alias="else")

    @field_validator("bands")
    @classmethod
    def _descending(cls, bands: list[GradeBand]) -> list[GradeBand]:
        mins = [b.min for b in bands]
        if mins != sorted(mins, reverse=True):
            raise ValueError("grade bands must be listed from the highest 'min' down")
        return bands


class Ladder(_Strict):
    """A ladder of grades, best first, with its key grades and how a grade is decided."""

    description: str | None = None
    grades: list[str] = Field(min_length=2)
    key: list[str] = Field(default_factory=list)
    decide: ScoreBands

    @model_validator(mode="after")
    def _known_grades(self) -> "Ladder":
        if len(set(self.grades)) != len(self.grades):
            raise ValueError("grades must be unique")
        known = set(self.grades)
        found: list[tuple[tuple[str | int, ...], str, Any]] = []
        for i, name in enumerate(self.key):
            if name not in known:
                found.append((("key", i), f"key grade {name!r} is not one of the ladder's grades {self.grades}", name))
        for i, band in enumerate(self.decide.bands):
            if band.grade not in known:
                found.append((("decide", "bands", i, "grade"),
                              f"band grade {band.grade!r} is not one of the ladder's grades {self.grades}", band.grade))
        if self.decide.otherwise not in known:
            found.append((("decide", "else"),
                          f"else grade {self.decide.otherwise!r} is not one of the ladder's grades {self.grades}",
                          self.decide.otherwise))
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
    scores: dict[str, Score]
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
    def _known_scores(self) -> "Ruleset":
        found: list[tuple[tuple[str | int, ...], str, Any]] = []
        for name, ladder in self.ladders.items():
            for i, score in enumerate(ladder.decide.sum):
                if score not in self.scores:
                    found.append((("ladders", name, "decide", "sum", i),
                                  f"ladder {name!r} sums unknown score {score!r}; known: {sorted(self.scores)}", score))
        if found:
            raise _problems("Ruleset", found)
        return self


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
        line = mark.line + 1
    return line
