"""Fixtures of the pure rules tests (no broker)."""

from __future__ import annotations

import pytest

from rules.engine import CompiledRuleset, compile_ruleset
from rules.ruleset import load


@pytest.fixture(scope="session")
def rfm5() -> CompiledRuleset:
    return compile_ruleset(load("rfm-5"))
