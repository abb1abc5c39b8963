"""The Faust side of gradeflow: app, agent, tables, sinks and the ``gradeflow`` CLI."""

__version__ = "0.1.0"

from schemas.compiled import attach as _attach

_attach(__name__, __path__)
