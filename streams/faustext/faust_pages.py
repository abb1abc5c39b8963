"""Faust's own web pages, closed on gradeflow's HTTP server.

Faust serves built-in pages beside an app's own: ``/router`` (which worker
owns a key, and so every worker's address), ``/table/<name>/<key>`` (any
table value: a customer's whole state), and with ``debug`` ``/graph``,
``/assignment`` and sensor statistics at ``/``. None of them knows about
``GRADEFLOW_API_TOKEN``, and gradeflow uses none of them (its own
``/customers/{id}`` reads the local table or Redis and never forwards to
another worker), so they are turned off before the web server is built.
``/`` then answers Faust's plain ``{"status": "OK"}``.
"""

from __future__ import annotations

from typing import Any

# Faust's settings that switch its built-in pages (faust.web.base.BLUEPRINT_FLAGS).
BUILTIN_PAGE_SETTINGS = ("web_router_enabled", "web_tables_enabled", "web_graph_enabled",
                         "web_stats_enabled", "web_metrics_enabled")


def close_builtin_pages(app: Any) -> None:
    """Turn every Faust built-in page off; call before the first ``app.page`` (it builds the server)."""
    if "web" in app.__dict__:
        # Faust picks its blueprints once, when it builds its web driver: too late to change.
        raise RuntimeError("close_builtin_pages must run before the app's web server is built")
    for name in BUILTIN_PAGE_SETTINGS:
        setattr(app.conf, name, False)
