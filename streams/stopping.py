"""A worker stops within a deadline of its stop signal, whatever it was waiting on.

A clean stop waits for the batch in flight, flushes the producer and commits. Each of those
waits on the brokers: with a partition that has no leader (a broker down, replication factor
1) the producer's flush waits for a leader for as long as its request timeout, and Kubernetes
kills a pod 30 s after SIGTERM whatever it is doing. Past ``GRADEFLOW_STOP_TIMEOUT_S`` the worker
exits by itself instead, with a log line saying so. That is safe for the same reason a crash is:
records are acknowledged only once their outputs and state are on the brokers, so whatever the
worker had not acknowledged is read again by whoever takes its partitions next.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("gradeflow")

# EX_TEMPFAIL: the stop was cut short, nothing acknowledged is lost, the work in hand will be redone.
EXIT_STOP_DEADLINE = 75


class StopDeadline:
    """Armed by the first stop signal; exits the process ``seconds`` later if it is still there."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        if self._timer is not None:
            return
        # A thread, not a task of the event loop: the loop may be the thing that is stuck.
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        log.warning("gradeflow: the worker did not stop within %.0f s of the signal (GRADEFLOW_STOP_TIMEOUT_S): "
                    "exiting now; records it had not acknowledged will be read again", self.seconds)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_STOP_DEADLINE)
