"""Candidate rulesets for the shadow tests: rfm-5 with another version and other bounds."""

from __future__ import annotations

from rules.engine import CompiledRuleset, compile_ruleset
from rules.ruleset import PRESETS_DIR, parse

RFM5 = (PRESETS_DIR / "rfm-5.yaml").read_text(encoding="utf-8")


def candidate(version: str = "2", *, recency: bool = True, monetary: bool = True, **replace: str) -> CompiledRuleset:
    """rfm-5 at ``version``: R5 only within 3 days (time moves its grades at other instants than
    rfm-5's) and M3 from 3000 CNY (more customers graded higher), as asked; ``replace``: more
    text replacements (old=new)."""
    text = RFM5.replace('version: "1"', f'version: "{version}"')
    if recency:
        text = text.replace("- {max: 7, score: 5}", "- {max: 3, score: 5}")
    if monetary:
        text = text.replace('- {min: "5000", score: 3}', '- {min: "3000", score: 3}')
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return compile_ruleset(parse(text, f"rfm-5@{version}"))
