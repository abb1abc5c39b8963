"""Population-wide thresholds for relative grades, from mergeable quantile sketches.

"Top 5% by 365-day spend" and "above the median frequency" compare a
customer's value with a quantile of everyone's current value. Customers are
spread over partitions and workers, so each partition keeps a sketch of its
customers' values (one per metric the ruleset compares relatively), the
sketches are merged, and the merged sketch gives the thresholds.

The sketch is DDSketch (the ``ddsketch`` library, Datadog's reference
implementation): with relative accuracy ``α`` (here 1%), the value it returns
for quantile ``q`` is within ``α × |x|`` of ``x``, the exact ``q``-quantile of
the values added (``x`` being the value of rank ``q × (n − 1)``, rounded
either way when that rank falls between two values). Sketches of the same
accuracy merge without further loss: merging per-partition sketches gives the
same guarantee as one sketch of everything. Consequence for grading: a
customer whose value is more than ``α × |threshold|`` away from the exact
threshold gets the same grade as with exact quantiles; only customers within
that band of the boundary may fall on either side.

Pure: no Kafka here; streams/population.py moves the bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

import orjson
from ddsketch import DDSketch

from rules.engine import CompiledRuleset, metric_values
from rules.state import CustomerState

RELATIVE_ACCURACY = 0.01
_FORMAT = 1


class Sketch:
    """A mergeable quantile sketch with relative accuracy ``alpha`` (see the module's error bound)."""

    __slots__ = ("alpha", "_s")

    def __init__(self, alpha: float = RELATIVE_ACCURACY) -> None:
        self.alpha = alpha
        self._s = DDSketch(alpha)

    def add(self, value: float, weight: float = 1.0) -> None:
        self._s.add(float(value), weight)

    def merge(self, other: "Sketch") -> None:
        if other.alpha != self.alpha:
            raise ValueError(f"cannot merge sketches of accuracy {self.alpha} and {other.alpha}")
        if other.count:
            self._s.merge(other._s)

    @property
    def count(self) -> int:
        return int(self._s.count)

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile within the relative accuracy, or None when empty."""
        if not self.count:
            return None
        return self._s.get_quantile_value(q)

    def to_bytes(self) -> bytes:
        """Compact bytes (sparse bins), readable by :meth:`from_bytes`."""
        s = self._s

        def bins(store) -> list[list[float]]:  # noqa: ANN001 - ddsketch's store
            return [[store.offset + i, c] for i, c in enumerate(store.bins) if c]

        return orjson.dumps({"v": _FORMAT, "a": self.alpha, "p": bins(s._store), "n": bins(s._negative_store),
                             "z": s._zero_count, "c": s._count, "s": s._sum, "lo": s._min, "hi": s._max})

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Sketch":
        doc = orjson.loads(raw)
        if doc.get("v") != _FORMAT:
            raise ValueError(f"unknown sketch format {doc.get('v')!r}")
        sketch = cls(doc["a"])
        s = sketch._s
        for key, count in doc["p"]:
            s._store.add(int(key), count)
        for key, count in doc["n"]:
            s._negative_store.add(int(key), count)
        s._zero_count = doc["z"]
        s._count = doc["c"]
        s._sum = doc["s"]
        s._min = doc["lo"] if doc["lo"] is not None else float("+inf")
        s._max = doc["hi"] if doc["hi"] is not None else float("-inf")
        return sketch


def relative_metrics(rs: CompiledRuleset) -> tuple[str, ...]:
    """The metrics whose population the ruleset compares against (empty: no relative grades)."""
    return tuple(sorted({m for m, _ in rs.quantiles}))


def observe(rs: CompiledRuleset, sketches: dict[str, Sketch], state: CustomerState, as_of: datetime) -> None:
    """Add one customer's current values (as of ``as_of``) to the sketches; unknown values are left out."""
    wanted = relative_metrics(rs)
    if not wanted:
        return
    values = metric_values(rs, state, as_of)
    for name in wanted:
        value = values.get(name)
        if value is not None:
            sketch = sketches.get(name)
            if sketch is None:
                sketch = sketches[name] = Sketch()
            sketch.add(value)


def build(rs: CompiledRuleset, states: Iterable[CustomerState], as_of: datetime) -> dict[str, Sketch]:
    """Sketches of every customer in ``states`` (e.g. one partition's table) as of ``as_of``."""
    sketches: dict[str, Sketch] = {}
    for state in states:
        observe(rs, sketches, state, as_of)
    return sketches


def merge(parts: Iterable[Mapping[str, Sketch]]) -> dict[str, Sketch]:
    """Merge per-partition sketches, metric by metric."""
    merged: dict[str, Sketch] = {}
    for part in parts:
        for name, sketch in part.items():
            into = merged.get(name)
            if into is None:
                into = merged[name] = Sketch(sketch.alpha)
            into.merge(sketch)
    return merged


def thresholds(rs: CompiledRuleset, sketches: Mapping[str, Sketch]) -> dict[tuple[str, float], float]:
    """The population thresholds ``(metric, q) → value`` that evaluate() compares against."""
    out: dict[tuple[str, float], float] = {}
    for name, q in rs.quantiles:
        sketch = sketches.get(name)
        value = sketch.quantile(q) if sketch is not None else None
        if value is not None:
            out[(name, q)] = value
    return out


def encode(sketches: Mapping[str, Sketch]) -> bytes:
    """Per-metric sketches as one message value (the compacted population topic)."""
    return orjson.dumps({name: sketch.to_bytes().decode() for name, sketch in sketches.items()})


def decode(raw: bytes) -> dict[str, Sketch]:
    return {name: Sketch.from_bytes(text.encode()) for name, text in orjson.loads(raw).items()}
