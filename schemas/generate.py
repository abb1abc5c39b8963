"""Write the JSON Schema files of every event model: ``python -m schemas.generate [--check]``.

One file per model in :data:`schemas.events.ALL_MODELS`, at
``schemas/json/<name>.schema.json``, generated from the pydantic models so the
files and the models cannot drift (a test compares them). ``--check`` writes
nothing and exits 1 naming every file that is missing or stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schemas import SCHEMA_VERSION
from schemas.events import ALL_MODELS

JSON_DIR = Path(__file__).parent / "json"
BASE_URL = "https://gradeflow.dev/schemas"


def schema_of(name: str) -> dict[str, Any]:
    """The JSON Schema of model ``name``, with its ``$id`` and ``title``."""
    model = ALL_MODELS[name]
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"{BASE_URL}/{name}/v{SCHEMA_VERSION}.json"
    schema["title"] = f"gradeflow {name} v{SCHEMA_VERSION}"
    return schema


def render(name: str) -> str:
    """The exact text of ``<name>.schema.json``."""
    return json.dumps(schema_of(name), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected_files(directory: Path = JSON_DIR) -> dict[Path, str]:
    return {directory / f"{name}.schema.json": render(name) for name in ALL_MODELS}


def stale_files(directory: Path = JSON_DIR) -> list[Path]:
    """Files that are missing or differ from what the models generate."""
    stale = []
    for path, text in expected_files(directory).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file is missing or stale")
    parser.add_argument("--dir", type=Path, default=JSON_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.dir)
        for path in stale:
            print(f"stale: {path} (run: python -m schemas.generate)", file=sys.stderr)
        return 1 if stale else 0
    args.dir.mkdir(parents=True, exist_ok=True)
    for path, text in expected_files(args.dir).items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
