"""Response bodies of the worker's HTTP API (streams/downstream/web.py); the OpenAPI description is built from them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from schemas.events import Cause, Metrics, RulesetRef


class LadderGrade(BaseModel):
    """The current grade of one customer on one ladder."""

    grade: str
    as_of: str | None = Field(description="Event time of the evaluation (RFC 3339).")
    metrics: Metrics | None = Field(description="From the table: as of the customer's latest event. "
                                                "From Redis: as of the last grade change.")
    event_id: str | None = Field(None, description="Grade-change event that set this grade (Redis only).")
    previous_grade: str | None = None
    direction: str | None = None
    ruleset: RulesetRef | None = None
    emitted_at: str | None = Field(None, description="When the grade change was emitted (Redis only).")
    offset: int | None = Field(None, description="Offset of the change on grade-changes (Redis only; -1: filled "
                                                 "from the tables by `gradeflow redis rebuild`).")
    from_: Literal["table"] | None = Field(None, alias="from",
                                           description="'table' when `redis rebuild` filled it from the table changelog.")


class CustomerGrades(BaseModel):
    """``GET /customers/{customer_id}``."""

    customer_id: str
    source: Literal["table", "redis"] = Field(
        description="'table': the authoritative Faust table of this worker (the customer's partition is local); "
                    "'redis': the Redis copy written from grade-changes.")
    partition: int | None = Field(
        description="The input partition whose changelog holds the customer's state on this worker (source "
                    "'table'); null for an answer from Redis.")
    grades: dict[str, LadderGrade] = Field(description="By ladder.")


class GradeCounts(BaseModel):
    """``GET /grades``."""

    source: Literal["redis"] = "redis"
    ladders: dict[str, dict[str, int]] = Field(description="Ladder → grade → number of customers.")


class Health(BaseModel):
    """``GET /healthz`` and ``GET /readyz``."""

    status: Literal["ok", "ready", "not_ready"]
    detail: dict[str, object] = Field(default_factory=dict)


class Error(BaseModel):
    error: str


# --- grade history (GET /customers/{customer_id}/history, streams/downstream/history.py) ---------------------

class HistoryChange(BaseModel):
    """One grade change as the history keeps it: the ``grade-changes`` document without its emission time."""

    event_id: str = Field(description="The change's deterministic id on grade-changes.")
    ladder: str
    previous_grade: str | None
    grade: str
    direction: Literal["initial", "upgrade", "downgrade", "ended"] | None
    as_of: str = Field(description="Event time at which the grade was evaluated (RFC 3339).")
    cause: Cause = Field(description="What caused it; event_id is the transaction's or interaction's id.")
    ruleset: RulesetRef | None = Field(description="The ruleset version that decided it.")
    metrics: Metrics | None
    reasons: list[str] = Field(description="Why the ladder gave this grade, one sentence per step.")
    offset: int = Field(description="Offset of the change on grade-changes (orders changes with the same as_of).")


class LadderHistory(BaseModel):
    changes: list[HistoryChange] = Field(description="Oldest first: the window asked for, its latest `limit` changes.")
    kept_from: str = Field(description="as_of of the oldest change kept (the history is bounded).")
    complete: bool = Field(description="The oldest change kept is the customer's first grade on this ladder: "
                                       "nothing was dropped.")


class CustomerHistory(BaseModel):
    """``GET /customers/{customer_id}/history``."""

    customer_id: str
    ladders: dict[str, LadderHistory] = Field(description="By ladder (only ladders with changes).")
    max_changes: int = Field(description="GRADEFLOW_HISTORY_MAX_CHANGES: changes kept per customer and ladder.")
    max_age_days: float = Field(description="GRADEFLOW_HISTORY_MAX_AGE_DAYS: event-time age kept, counted back from "
                                            "the newest change of the ladder (plus the change in effect then).")
