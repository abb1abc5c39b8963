"""The grading engine: pure logic, no Kafka, no Redis, no clock of its own.

It is given a customer's state and an evaluation time and returns grades with
the metrics and reasons behind them. See rules/README.md.
"""

from schemas.compiled import attach as _attach

_attach(__name__, __path__)
