"""What reaches into faust-streaming's and aiokafka's internals: batch consumer, recovery, table stores, outbox.

These modules override private methods and read private attributes of Faust's consumer, table
manager and stores, and of aiokafka's producer and fetcher; a release of either may rename or
reshape them without notice. Importing this package therefore checks, once, that the installed
releases are the ones the code is tested with (:data:`TESTED`) and refuses any other with
:class:`UntestedDependency`, rather than let a worker start that might grade customers on state
it did not recover. pyproject.toml pins the same versions.
"""

from __future__ import annotations

import re
from importlib import metadata

from schemas.compiled import attach as _attach
from schemas.errors import ConfigurationError

# Distribution name: (the tested release, or the leading part of it that must match; as a reader
# says it). faust-streaming at one release, as pyproject.toml pins it; aiokafka within 0.14.
TESTED: dict[str, tuple[tuple[int, ...], str]] = {
    "faust-streaming": ((0, 15, 3), "0.15.3"),
    "aiokafka": ((0, 14), "0.14.x"),
}


class UntestedDependency(ConfigurationError):
    """faust-streaming or aiokafka is installed at a release streams/faustext is not tested with."""


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of ``version`` (``0.14.0rc1`` → (0, 14, 0)); () when unreadable."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group().split(".")) if match else ()


def installed_versions() -> dict[str, str | None]:
    """The installed version of each distribution in :data:`TESTED`; None when it is not installed."""
    found: dict[str, str | None] = {}
    for name in TESTED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def check_versions() -> None:
    """Raise :class:`UntestedDependency` unless every distribution in :data:`TESTED` is installed at
    a tested release; the message names what was found, what is supported and what to do."""
    found = installed_versions()
    wrong = []
    for name, (series, _) in TESTED.items():
        version = found[name]
        release = _release(version) if version is not None else ()
        exact = len(series) == 3
        if version is None or (release != series if exact else release[:len(series)] != series):
            wrong.append(name)
    if wrong:
        have = ", ".join(f"{name} {found[name] or 'not installed'}" for name in TESTED)
        want = " and ".join(f"{name} {said}" for name, (_, said) in TESTED.items())
        raise UntestedDependency(
            f"found {have}; gradeflow's Faust extensions (streams/faustext) reach into these libraries' "
            f"internals and are tested only with {want}. Install the tested releases "
            f"(pip install 'faust-streaming==0.15.3' 'aiokafka>=0.14,<0.15', as pyproject.toml pins them), "
            f"or port streams/faustext to the new release and extend its TESTED versions once its tests pass.")


check_versions()

_attach(__name__, __path__)
