"""``gradeflow explain --customer ID --at TIME``: a customer's grades at an instant, from a live cluster.

It asks a worker's HTTP API (``GET /customers/{id}/history``, with ``GRADEFLOW_API_TOKEN``) rather
than Redis: the operator needs the API's address and token only, not Redis credentials, and the
answer is the one the API gives everybody else. The history is bounded
(``GRADEFLOW_HISTORY_MAX_CHANGES``, ``GRADEFLOW_HISTORY_MAX_AGE_DAYS``): an instant before the oldest
change kept is answered as unknown, never guessed.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from schemas.errors import GradeflowError
from streams.downstream.history import epoch_us, in_effect
from streams.settings import masked_url


class ExplainError(GradeflowError):
    """The API could not answer (unreachable, refused, unknown customer)."""


def fetch(api: str, customer_id: str, token: str | None, ladder: str | None = None,
          timeout_s: float = 10.0) -> dict[str, Any]:
    """The customer's history from the API at ``api`` (``GET /customers/{id}/history``)."""
    url = f"{api.rstrip('/')}/customers/{quote(customer_id, safe='')}/history"
    if ladder:
        url += "?" + urlencode({"ladder": ladder})
    shown = masked_url(api)  # a URL may carry a password; errors never show it
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return dict(orjson.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        try:
            detail = str(orjson.loads(exc.read()).get("error", ""))
        except (orjson.JSONDecodeError, AttributeError):
            detail = ""
        raise ExplainError(f"{shown} answered {exc.code}{': ' + detail if detail else ''}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: a malformed URL
        reason = getattr(exc, "reason", exc)
        raise ExplainError(f"cannot reach the API at {shown}: {reason}") from None


def explain(doc: dict[str, Any], at: datetime) -> dict[str, Any]:
    """Per ladder: the grade in effect at ``at``, the change that set it, and the next change after ``at``."""
    at_us = epoch_us(at.isoformat())
    ladders: dict[str, Any] = {}
    for ladder, part in sorted(doc.get("ladders", {}).items()):
        current, following, known = in_effect(part["changes"], at_us)
        ladders[ladder] = {
            "grade": current["grade"] if current else None,
            "known": known,
            "set_by": current,
            "next": following,
            "kept_from": part.get("kept_from"),
        }
    return {"customer_id": doc.get("customer_id"), "at": at.isoformat(), "ladders": ladders}


def _change_line(change: dict[str, Any]) -> str:
    cause = change.get("cause") or {}
    rs = change.get("ruleset") or {}
    moved = f"{change.get('previous_grade') or '(none)'} → {change['grade']}"
    why = str(cause.get("kind"))
    if cause.get("event_id"):
        why += f" (event {cause['event_id']})"
    ruleset = f"{rs.get('id')}@{rs.get('version')}" if rs else "unknown"
    return (f"{change['as_of']}: {moved} ({change.get('direction')}), cause {why}, ruleset {ruleset}, "
            f"change {change.get('event_id')}")


def _metrics_line(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "metrics: none recorded"
    values = metrics.get("values") or {}
    head = " ".join(f"{k}={metrics.get(k)}" for k in ("recency_days", "frequency", "monetary", "code"))
    tail = " ".join(f"{k}={v}" for k, v in values.items())
    return f"metrics: {head}" + (f"; {tail}" if tail else "")


def render(result: dict[str, Any]) -> str:
    """The text ``gradeflow explain`` prints."""
    lines = [f"customer {result['customer_id']} at {result['at']}"]
    if not result["ladders"]:
        lines.append("  no history on that ladder")
    for ladder, part in result["ladders"].items():
        current, following = part["set_by"], part["next"]
        if current is not None:
            lines.append(f"ladder {ladder}: {current['grade']}")
            lines.append(f"  set {_change_line(current)}")
            lines.append(f"  {_metrics_line(current.get('metrics'))}")
            lines += [f"  reason: {r}" for r in current.get("reasons") or []]
        elif part["known"]:
            lines.append(f"ladder {ladder}: no grade yet")
        else:
            lines.append(f"ladder {ladder}: unknown (before {part['kept_from']}, the oldest change the bounded "
                         "history keeps)")
        lines.append(f"  next {_change_line(following)}" if following is not None else "  next: none since")
    return "\n".join(lines)
