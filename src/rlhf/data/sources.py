"""Sources: where a split's rows come from, how their keys are named, and how several are mixed.

A source is a path (or hub name), a `{path, weight, columns}` mapping (`rlhf.config.SourceCfg`), or a
list of these. `columns` maps the schema's key names onto a file's own (`{prompt: question}` reads the
file's `question` as `prompt`); `weight` scales a source's rows in the mix (1: every row once, 0.5: a
seeded half, 2: every row twice). Nothing here imports the config module: a source is read by its
attributes or keys.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from rlhf.data.formats import ROW_KEYS, SCORE_KEYS
from rlhf.errors import DataError

# Keys a row may leave out: a mapping onto one of these is not an error on a row without it.
OPTIONAL_KEYS = ("system", "input", "history", "margin", *(k for pair in SCORE_KEYS for k in pair))


@dataclass(frozen=True)
class Part:
    """One source of a split."""

    path: str
    weight: float = 1.0
    columns: dict[str, str] = field(default_factory=dict)
    """Schema key -> the file's own key."""

    def rename(self, row: dict, location: str) -> dict:
        """`row` with the file's own keys renamed to the schema's; a row without a required mapped key raises."""
        if not self.columns:
            return row
        theirs = set(self.columns.values())
        out = {k: v for k, v in row.items() if k not in theirs and k not in self.columns}
        for ours, their in self.columns.items():
            if their in row:
                out[ours] = row[their]
            elif ours not in OPTIONAL_KEYS:
                keys = ", ".join(sorted(map(str, row))) or "none"
                raise DataError(
                    f"{location}: no '{their}' in this row (columns map it to '{ours}'); row keys: {keys}"
                )
        return out

    def mapped(self) -> list[str]:
        """`their -> ours` for each mapped key, for `rlhf data inspect`."""
        return [f"{their} -> {ours}" for ours, their in self.columns.items()]


def _part(item: Any) -> Part:
    """A Part from a path, a mapping, or an object with `path` (and optional `weight`, `columns`)."""
    if isinstance(item, Part):
        return item
    if isinstance(item, str):
        return Part(item)
    get = item.get if isinstance(item, dict) else lambda key, default=None: getattr(item, key, default)
    path = get("path")
    if not isinstance(path, str) or not path:
        raise DataError(f"a data source needs a path, got {item!r}")
    columns = dict(get("columns") or {})
    unknown = sorted(set(columns) - set(ROW_KEYS))
    if unknown:
        raise DataError(
            f"{path}: columns map {', '.join(map(repr, unknown))}, which no format reads; map onto one of "
            f"{', '.join(ROW_KEYS)}"
        )
    weight = float(get("weight", 1.0))
    if not weight > 0:
        raise DataError(f"{path}: weight must be > 0, got {weight}")
    return Part(path, weight, columns)


def parts(source: Any) -> list[Part]:
    """The parts of a source: a path, a `{path, weight, columns}` mapping or object, or a list of them."""
    items = source if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise DataError("a data source list is empty; give at least one path")
    return [_part(item) for item in items]


def label(source: Any) -> str:
    """A source as one short string: its path, or `a.jsonl (x0.5) + b.jsonl` for a mix."""
    shown = parts(source)
    if len(shown) == 1 and shown[0].weight == 1.0:
        return shown[0].path
    return " + ".join(p.path if p.weight == 1.0 else f"{p.path} (x{p.weight:g})" for p in shown)


def n_taken(n: int, weight: float) -> int:
    """How many rows `take` returns from `n` rows at `weight`."""
    return n * int(weight) + round((weight - int(weight)) * n)


def take(rows: list, weight: float, rng: random.Random) -> list:
    """`weight` times the rows: every row `int(weight)` times, then a sample without replacement for the
    fraction (so 0.5 is a random half and 2.5 is every row twice plus a random half)."""
    whole = int(weight)
    extra = rng.sample(range(len(rows)), n_taken(len(rows), weight) - whole * len(rows))
    return rows * whole + [rows[i] for i in sorted(extra)]


def mix(row_lists: list[list], weights: list[float], seed: int) -> list:
    """The rows of several parts, each taken `weight` times (`take`), in part order; seeded."""
    rng = random.Random(seed)
    out: list = []
    for rows, weight in zip(row_lists, weights, strict=True):
        out += take(rows, weight, rng)
    return out
