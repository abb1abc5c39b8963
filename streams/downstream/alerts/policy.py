"""What to alert on, decided without I/O: severity, dedup keys, causes, recoveries, the storm
guard, the alert settings' checks, and how a vendor's refusal is classified.

The alerts themselves are decided by rules/changes.py (downgrades of key customers) and
rules/risk.py (at-risk warnings); this module says how bad one is, which incident it belongs to
(:func:`dedup_key`), what made it (:func:`cause_of`), when a grade change ends it
(:func:`recovery_of`), when pages are folded into a storm summary (:class:`StormGuard`), and
whether a sink's answer is worth a retry (:func:`classify`, :func:`retry_after_s`). Delivery is in
``delivery.py``, the sinks' request formats in ``sinks.py``.
"""

from __future__ import annotations

import email.utils
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from rules.changes import Cause, change_id
from rules.engine import CompiledLadder, CompiledRuleset

SEVERITIES = ("critical", "warning", "info")
SEV_RANK = {"info": 0, "warning": 1, "critical": 2}
SINK_NAMES = ("webhook", "slack", "pagerduty", "alertmanager")


# --------------------------------------------------------------------------- severity


@dataclass(frozen=True)
class SeverityRule:
    """How bad a downgrade is, for one ladder.

    critical when the grade fell by ``critical_min_drop`` steps or more, or the
    grade left is ``critical_at_or_below`` or worse (default: any grade that is
    not a key grade); else warning when it fell by ``warning_min_drop`` steps or
    more; else info.
    """

    critical_min_drop: int = 2
    critical_at_or_below: str | None = None
    warning_min_drop: int = 1

    @classmethod
    def from_config(cls, raw: dict[str, Any] | None) -> "SeverityRule":
        raw = dict(raw or {})
        unknown = set(raw) - {"critical_min_drop", "critical_at_or_below", "warning_min_drop"}
        if unknown:
            raise ValueError(f"unknown alert severity setting(s): {', '.join(sorted(unknown))}")
        return cls(**raw)


def severity(ladder: CompiledLadder, previous: str, grade: str, rule: SeverityRule) -> str:
    """Severity of the downgrade ``previous`` → ``grade`` on ``ladder``."""
    rank = ladder.rank
    drop = rank.get(grade, len(rank)) - rank.get(previous, 0)
    if rule.critical_at_or_below is not None:
        bad = rank.get(grade, len(rank)) >= rank.get(rule.critical_at_or_below, len(rank))
    else:
        bad = grade not in ladder.key
    if drop >= rule.critical_min_drop or bad:
        return "critical"
    if drop >= rule.warning_min_drop:
        return "warning"
    return "info"


def dedup_key(ladder: str, customer_id: str) -> str:
    """The alert's ``dedup_key``, as rules/changes.py builds it (stable per customer and ladder)."""
    return f"gradeflow/{ladder}/{customer_id}/key-downgrade"


def is_at_risk(alert: dict[str, Any]) -> bool:
    """Whether ``alert`` is an at-risk warning (kind ``at_risk``, rules/risk.py), not a downgrade."""
    return alert.get("kind") == "at_risk"


def is_storm(alert: dict[str, Any]) -> bool:
    """Whether ``alert`` is the summary of an alert storm (:class:`StormGuard`), not one customer's."""
    return alert.get("kind") == "storm"


def cause_of(alert: dict[str, Any], ruleset: CompiledRuleset) -> str:
    """What made the alert: ``transaction``, ``interaction``, ``clock`` (time alone) or ``rules``
    (a new ruleset): the alert's ``cause``.

    An alert written by an earlier release carries no cause (one may still wait on the retry
    topic); its ``grade_change_event_id`` is the change's deterministic id (rules/changes.py
    ``change_id``), which for the clock and the rules is made of what the alert holds, so
    rebuilding it tells those two apart; anything else was an input ``event``.
    """
    cause = alert.get("cause")
    if isinstance(cause, dict) and isinstance(cause.get("kind"), str):
        return cause["kind"]
    if is_at_risk(alert):
        return "clock"
    try:
        as_of = datetime.fromisoformat(alert["as_of"])
        for kind in ("clock", "rules"):
            if change_id(alert["customer_id"], alert["ladder"], ruleset, Cause(kind, None), as_of,
                         alert["previous_grade"], alert["grade"]) == alert.get("grade_change_event_id"):
                return kind
    except (KeyError, TypeError, ValueError):
        pass
    return "event"


@dataclass(frozen=True)
class StormGuard:
    """Past ``threshold`` pages in a window (all customers together), further pages of that window
    are folded: not sent, counted by ladder, cause and severity, and summed up in one summary alert
    sent when the window ends. ``threshold`` 0: never fold. ``folds_rules``
    (GRADEFLOW_ALERT_FOLD_RULES_CHANGES): pages caused by a ruleset change are folded from the
    first, whatever the threshold, and do not count against it: one summary per ladder and window
    (:meth:`rules_summary`) says how many there were."""

    threshold: int
    window_s: float
    folds_rules: bool = False

    def window(self, now: float) -> int:
        return int(now // self.window_s)

    def bounds(self, window: int) -> tuple[float, float]:
        return window * self.window_s, (window + 1) * self.window_s

    def folds(self, count: int) -> bool:
        """Whether the ``count``-th page of a window is folded."""
        return self.threshold > 0 and count > self.threshold

    def summary(self, window: int, folded: dict[tuple[str, str, str], int], source: str) -> dict[str, Any]:
        """The summary alert of ``window``: ``folded`` counts pages by (ladder, cause, severity)."""
        start, end = (datetime.fromtimestamp(t, timezone.utc) for t in self.bounds(window))
        total = sum(folded.values())
        ladders = sorted({ladder for ladder, _, _ in folded})
        by_cause: dict[str, int] = {}
        for (_ladder, cause, _sev), n in folded.items():
            by_cause[cause] = by_cause.get(cause, 0) + n
        worst = max((sev for _, _, sev in folded), key=lambda v: SEV_RANK.get(v, 0), default="critical")
        parts = ", ".join(f"{n} on ladder '{ladder}' caused by {CAUSE_WORDS.get(cause, cause)}"
                          for (ladder, cause, _), n in sorted(folded.items()))
        ident = uuid.uuid5(uuid.NAMESPACE_URL, f"gradeflow/{source}/alert-storm/{window}/{self.window_s}")
        return {
            "schema_version": 1,
            "kind": "storm",
            "alert_id": str(ident),
            "customer_id": "*",
            "ladder": ",".join(ladders),
            "severity": worst,
            "summary": (f"Alert storm: {total} more key-customer pages between {rfc3339(start)} and "
                        f"{rfc3339(end)} than the {self.threshold} sent were folded into this one: {parts}. "
                        f"Every alert is on the alerts topic."),
            "previous_grade": "",
            "grade": "",
            "grade_change_event_id": "",
            "as_of": end.isoformat(),
            "dedup_key": f"gradeflow/alert-storm/{rfc3339(start)}",
            "count": total,
            "causes": by_cause,
            "folded": [{"ladder": ladder, "cause": cause, "severity": sev, "count": n}
                       for (ladder, cause, sev), n in sorted(folded.items())],
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
        }


    def rules_summary(self, window: int, ladder: str, by_severity: dict[str, int], source: str) -> dict[str, Any]:
        """The summary alert of the pages a ruleset change caused on ``ladder`` in ``window``
        (``by_severity``: how many of each severity), sent instead of them."""
        start, end = (datetime.fromtimestamp(t, timezone.utc) for t in self.bounds(window))
        total = sum(by_severity.values())
        worst = max(by_severity, key=lambda v: SEV_RANK.get(v, 0))
        parts = ", ".join(f"{n} {sev}" for sev, n in sorted(by_severity.items(), key=lambda i: -SEV_RANK.get(i[0], 0)))
        ident = uuid.uuid5(uuid.NAMESPACE_URL, f"gradeflow/{source}/rules-change/{ladder}/{window}/{self.window_s}")
        return {
            "schema_version": 1,
            "kind": "storm",
            "alert_id": str(ident),
            "customer_id": "*",
            "ladder": ladder,
            "severity": worst,
            "summary": (f"Ruleset change: {total} key customers were downgraded on ladder '{ladder}' by a new ruleset "
                        f"between {rfc3339(start)} and {rfc3339(end)} ({parts}); one summary instead of a page each "
                        f"(GRADEFLOW_ALERT_FOLD_RULES_CHANGES). Every alert is on the alerts topic."),
            "previous_grade": "",
            "grade": "",
            "grade_change_event_id": "",
            "as_of": end.isoformat(),
            "dedup_key": f"gradeflow/rules-change/{ladder}/{rfc3339(start)}",
            "count": total,
            "causes": {"rules": total},
            "folded": [{"ladder": ladder, "cause": "rules", "severity": sev, "count": n}
                       for sev, n in sorted(by_severity.items())],
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
        }


CAUSE_WORDS = {"clock": "the clock (time alone)", "rules": "a new ruleset", "transaction": "transactions",
               "interaction": "interactions", "event": "transactions or interactions"}


def recovery_of(change: dict[str, Any], ruleset: CompiledRuleset) -> dict[str, Any] | None:
    """A recovery if ``change`` is an upgrade into a key grade, or the end of an id merged into
    another (direction ``ended``: its open incidents are the surviving id's to raise now), else None."""
    direction = change.get("direction")
    if direction not in ("upgrade", "ended"):
        return None
    ladder = next((lad for lad in ruleset.ladders if lad.name == change.get("ladder")), None)
    if ladder is None or (direction == "upgrade" and change.get("grade") not in ladder.key):
        return None
    return {
        "recovery_id": change["event_id"],
        "customer_id": change["customer_id"],
        "ladder": ladder.name,
        "previous_grade": change.get("previous_grade"),
        "grade": change["grade"],
        "as_of": change["as_of"],
        "grade_change_event_id": change["event_id"],
        "dedup_key": dedup_key(ladder.name, change["customer_id"]),
    }


# --------------------------------------------------------------------------- vendor answers


PERMANENT, TRANSIENT = "permanent", "transient"
# Answers a retry cannot change whatever the vendor: the request itself is wrong (or gone).
_TRANSIENT_4XX = (408, 425, 429)


def classify(documented: dict[int, str], status: int | None) -> str:
    """PERMANENT or TRANSIENT for an answer ``status`` (None: no answer at all), given what the
    vendor documents for its endpoint (``documented``); a status it does not list follows the
    generic HTTP rule: 4xx but 408/425/429 permanent, everything else transient."""
    if status is None:
        return TRANSIENT  # refused, reset, timed out: the sink may be back in a moment
    if status in documented:
        return documented[status]
    if 400 <= status < 500 and status not in _TRANSIENT_4XX:
        return PERMANENT
    # 5xx, 408/425/429, and the odd 1xx/3xx: not the request's fault, so never dropped.
    return TRANSIENT


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 §10.2.3);
    None when absent or unreadable, 0 for a date already past."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- settings


def check_settings(settings: Any, ruleset: CompiledRuleset) -> dict[str, SeverityRule]:
    """The severity rule of every ladder; :class:`ConfigurationError` if the alert settings cannot work."""
    from schemas.errors import ConfigurationError

    ladders = {lad.name: lad for lad in ruleset.ladders}
    problems = []
    rules = {}
    for name in settings.alert_severity:
        if name not in ladders:
            problems.append(f"GRADEFLOW_ALERT_SEVERITY names ladder {name!r}, which ruleset "
                            f"{ruleset.id} does not have ({', '.join(ladders)})")
    for name, ladder in ladders.items():
        try:
            rule = SeverityRule.from_config(settings.alert_severity.get(name))
        except (TypeError, ValueError) as exc:
            problems.append(f"GRADEFLOW_ALERT_SEVERITY for ladder {name!r}: {exc}")
            continue
        if rule.critical_at_or_below is not None and rule.critical_at_or_below not in ladder.rank:
            problems.append(f"GRADEFLOW_ALERT_SEVERITY for ladder {name!r}: grade {rule.critical_at_or_below!r} "
                            f"is not one of {list(ladder.grades)}")
        rules[name] = rule
    for sev, names in settings.alert_routes.items():
        if sev not in SEVERITIES:
            problems.append(f"GRADEFLOW_ALERT_ROUTES: unknown severity {sev!r} (use {', '.join(SEVERITIES)})")
        for n in names:
            if n not in SINK_NAMES:
                problems.append(f"GRADEFLOW_ALERT_ROUTES: unknown sink {n!r} for {sev!r} (use {', '.join(SINK_NAMES)})")
    if problems:
        raise ConfigurationError("; ".join(problems))
    return rules
