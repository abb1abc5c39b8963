"""Contracts of gradeflow: pydantic models of every event on every topic.

The JSON Schema files in ``schemas/json/`` are generated from these models
(``python -m schemas.generate``) for consumers written in other languages.
"""

from schemas.compiled import attach as _attach

SCHEMA_VERSION = 1

_attach(__name__, __path__)
