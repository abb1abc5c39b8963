"""``gradeflow rules promote CANDIDATE`` and ``gradeflow rules rollback``: write the next
rules-control record (streams/rules_control.py) and, with ``--wait``, follow every worker's
re-grade on the same topic with a progress bar until every input partition is done."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from rules.engine import compile_ruleset
from rules.ruleset import load, parse, resolve
from schemas.events import RulesControl
from streams.rules_control import (ControlError, build_record, compile_record, coverage, key_of, read_control,
                                   read_topic, topic_partitions, write_record)


def _input_partitions(settings: Any) -> int:
    found = topic_partitions(settings, settings.topics.transactions)
    if not found:
        raise ControlError(f"{settings.topics.transactions}: missing (create it with `gradeflow topics create`)")
    return found


def promote(settings: Any, candidate: str, out: TextIO = sys.stderr) -> RulesControl | None:
    """Make ``candidate`` (a preset name or YAML file) the active ruleset; return the record written,
    or None when it is active already."""
    ruleset = compile_ruleset(load(candidate))  # refuses an unreadable or invalid file, naming it
    text = resolve(candidate).read_text(encoding="utf-8")
    current, _ = read_control(settings)
    if current is not None and key_of(current.ruleset) == ruleset.key:
        if current.document != text:
            raise ControlError(f"ruleset {ruleset.key} is active with another document: a changed ruleset needs a "
                               f"new version (workers know which customers they graded by id@version only)")
        print(f"gradeflow: ruleset {ruleset.key} is active already (rules-control v{current.control_version})",
              file=out)
        return None
    local_text = resolve(settings.ruleset).read_text(encoding="utf-8")
    local = compile_ruleset(parse(local_text, settings.ruleset))
    if current is None and local.key == ruleset.key:
        if local_text != text:
            raise ControlError(f"ruleset {ruleset.key} is what GRADEFLOW_RULESET runs, with another document: "
                               f"a changed ruleset needs a new version")
        print(f"gradeflow: ruleset {ruleset.key} is active already (GRADEFLOW_RULESET, never promoted)", file=out)
        return None
    record = build_record(settings, current, local, local_text, ruleset, text, "promote")
    write_record(settings, record)
    print(f"gradeflow: promoted {ruleset.key} (rules-control v{record.control_version}, previous "
          f"{key_of(record.previous) if record.previous else '-'})", file=out)
    return record


def rollback(settings: Any, out: TextIO = sys.stderr) -> RulesControl:
    """Make the ruleset active before the current one active again; return the record written."""
    current, _ = read_control(settings)
    if current is None or current.previous is None or current.previous_document is None:
        raise ControlError("nothing to roll back: no ruleset was ever promoted on this app")
    target = compile_ruleset(parse(current.previous_document, f"rules-control v{current.control_version} previous"))
    active = compile_record(current)
    record = build_record(settings, current, active, current.document, target, current.previous_document, "rollback")
    write_record(settings, record)
    print(f"gradeflow: rolled back to {target.key} from {active.key} (rules-control v{record.control_version})",
          file=out)
    return record


def wait(settings: Any, record: RulesControl, timeout_s: float, quiet: bool = False, out: TextIO = sys.stderr,
         poll_s: float = 0.5) -> bool:
    """Follow the workers' progress reports for ``record`` until every input partition is re-graded;
    True when done within ``timeout_s``. The bar counts customers examined of those to examine,
    over every worker that has reported."""
    from tqdm import tqdm

    partitions = _input_partitions(settings)
    target = key_of(record.ruleset)
    deadline = time.monotonic() + timeout_s
    bar = None if quiet else tqdm(total=0, unit="customer", desc=f"re-grading for {target}", file=out,
                                  dynamic_ncols=True)
    try:
        while True:
            records, _ = read_topic(settings, check=False)
            done, examined, total, reports = coverage(records, record.control_version, target)
            if bar is not None:
                bar.total = max(total, examined)
                bar.n = examined
                bar.set_postfix(partitions=f"{len(done & set(range(partitions)))}/{partitions}",
                                workers=len(reports))
                bar.refresh()
            if set(range(partitions)) <= done:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.close()
