"""The one exception tree of gradeflow.

Every error gradeflow raises on purpose is a ``GradeflowError``; callers that
must not die (agents) catch this type and turn it into data (a dead letter).
"""

from __future__ import annotations


class GradeflowError(Exception):
    """Base of every error gradeflow raises on purpose."""


class InvalidEvent(GradeflowError):
    """An input event that cannot be applied; it becomes a dead letter.

    ``reason`` is a short stable code (``malformed_json``, ``invalid_field``,
    ...) that operators can count and filter on; the message is for people.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class RulesetError(GradeflowError):
    """A ruleset file that cannot be used, with where and what is wrong."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class ServerUnavailable(GradeflowError):
    """A server gradeflow needs (Kafka, Redis) does not answer."""


class ConfigurationError(GradeflowError):
    """Settings that cannot work together."""
