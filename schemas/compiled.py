"""The hot path compiled to C with mypyc, used when it was built from exactly these sources.

``make compile`` (run by ``make test``, ``make demo`` and the benches, when a source changed)
compiles :data:`MODULES` into ``.build/mypyc/`` beside the checkout; each package's
``__init__`` calls :func:`attach`, which puts the compiled modules ahead of the sources only
when the build's stamp is the hash of the sources as they are now. An edited source therefore
runs as written, never an older compiled copy; without a C compiler, or with a stale build, the
same code runs as plain Python, slower (docs/performance.md, "The hot path compiled"). The modules are the ones a
batch spends its time in; they type-check clean under mypy, which mypyc needs.

    python deploy/compile.py build     # compile (needs mypy, a C compiler, Python headers)
    python deploy/compile.py ensure    # compile unless the build is current
    python deploy/compile.py status    # compiled, stale or absent
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / ".build" / "mypyc"
MODULES = ("rules/windows.py", "rules/state.py", "rules/metrics.py", "rules/engine.py", "rules/deciders.py",
           "rules/explain.py", "rules/changes.py", "rules/schedule.py", "rules/risk.py", "schemas/decode.py",
           "schemas/money.py", "schemas/timestamps.py", "streams/processor.py", "streams/faustext/outbox.py")
# Every package holding a module of MODULES, as a path; each calls attach() in its __init__.
PACKAGES = ("rules", "schemas", "streams", "streams/faustext")
STAMP = BUILD / "stamp"

# "compiled", "stale" (built from other sources: not used), "absent"; set by the first attach().
STATUS: str | None = None


def source_stamp() -> str:
    """The hash of the compiled modules' sources and of this interpreter's version."""
    digest = hashlib.sha256(sys.version.encode())
    for name in MODULES:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return digest.hexdigest()


def status() -> str:
    """Whether the compiled modules are used: ``compiled``, ``stale`` or ``absent``."""
    global STATUS
    if STATUS is None:
        try:
            built = STAMP.read_text().strip()
        except OSError:
            STATUS = "absent"
        else:
            STATUS = "compiled" if built == source_stamp() else "stale"
    return STATUS


def attach(package: str, path: list[str]) -> None:
    """Put ``package``'s compiled modules ahead of its sources (``__path__``), when current."""
    if status() == "compiled":
        if str(BUILD) not in sys.path:
            sys.path.insert(0, str(BUILD))  # mypyc's shared runtime module sits at the build's top
        path.insert(0, str(BUILD.joinpath(*package.split("."))))
