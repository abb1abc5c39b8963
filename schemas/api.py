"""Response bodies of the worker's HTTP API (streams/downstream/web.py); the OpenAPI description is built from them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from schemas.events import Metrics, RulesetRef


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
