"""The downstream side: grades in Redis, alerts to on-call sinks, the HTTP API and Prometheus metrics.

``wiring.py`` attaches it all to the Faust app (docs/downstream.md).
"""
