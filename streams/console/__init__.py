"""The console: a web page for people, served by the worker's HTTP server, and the JSON it reads.

``GET /console/``                          the page (HTML, CSS and JS shipped in the package; no data in
                                           them, so they need no token: the page asks for it and sends it
                                           as ``Authorization: Bearer`` to every call below)
``GET /api/overview``                      per ladder: grade counts now and from-to moves over the last
                                           hour and day; changes per minute by cause; dead letters by
                                           reason; this worker's consumer lag; the ruleset
``GET /api/alerts``                        recent downgrades and at-risk warnings, newest first
                                           (``severity``, ``ladder``, ``kind``, ``limit``)
``GET /api/at-risk``                       warned key customers whose drop is ahead, soonest first, with
                                           what would keep their grade (``ladder``, ``limit``)
``GET /api/customers/{customer_id}/timeline``
                                           the customer's latest grade changes with their causes, current
                                           reasons, and the next instant the clock looks at them

The API's routes need the same token as the rest of the worker's API (``GRADEFLOW_API_TOKEN``) and
answer on the same address. What they read is bounded whatever the number of customers
(streams/console/feed.py keeps it in Redis).
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from streams.console.api import add_api, api_paths

log = logging.getLogger("gradeflow.console")

__all__ = ["register", "api_paths"]

# No charset parameter (Faust's web driver refuses one): index.html declares UTF-8, which its CSS and
# JS inherit; they keep to ASCII anyway.
_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".png": "image/png",
          ".svg": "image/svg+xml"}


def assets() -> dict[str, tuple[bytes, str]]:
    """The console's files by name, with their content type (read once, from the installed package)."""
    out = {}
    for entry in resources.files("streams.console").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _TYPES:
            out[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return out


def register(app: Any, settings: Any, table: Any, ruleset: Any, downstream: Any, guarded: Any) -> None:
    """Serve the console and its API on ``app``'s web server (``guarded``: the API's token-checking View)."""
    from faust.web import Request, Response, View

    files = assets()
    # The files change only with a new release; a reload after one fetches them again.
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

    @app.page("/console", name="gradeflow-console-root")
    async def console_root(self: View, request: Request) -> Response:
        return self.bytes(b"", status=308, headers={"Location": "/console/"})

    @app.page("/console/", name="gradeflow-console-index")
    async def console_index(self: View, request: Request) -> Response:
        body, kind = files["index.html"]
        return self.bytes(body, content_type=kind, headers=headers)

    @app.page("/console/{name}", name="gradeflow-console-asset")
    async def console_asset(self: View, request: Request, name: str) -> Response:
        found = files.get(name)  # only the shipped files: no path reaches the file system
        if found is None:
            return self.json({"error": f"no console file {name!r}"}, status=404)
        return self.bytes(found[0], content_type=found[1], headers=headers)

    add_api(app, settings, table, ruleset, downstream, guarded)
    if settings.downstream:
        from streams.console.agent import attach_feed

        attach_feed(app, settings, downstream)
