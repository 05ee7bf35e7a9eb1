"""Load a source into normalized rows under a bad-row policy, and the cheap check used by preflight.

`RowScanner` ties the loaders and the format adapters together: it reads records, renames the file's
own keys (`columns`), detects the format from the first recognizable row, checks that the format can
serve the requested kind (a whole-source error) and yields each row normalized, or the row's DataError.
A source of several parts is loaded part by part and mixed by weight (`rlhf.data.sources`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhf.data.formats import FORMAT_KINDS, KINDS, check_kind, detect_format, normalize_row
from rlhf.data.loaders import read_records
from rlhf.data.sources import Part, label, mix, parts
from rlhf.errors import DataError

BAD_ROW_POLICIES = ("error", "skip")
MAX_SKIP_MESSAGES = 5


@dataclass
class LoadResult:
    """Normalized rows of one source plus what happened while reading them."""

    rows: list[dict]
    """Rows in the internal schema for the requested kind."""
    format: str
    """Detected input format (see `rlhf.data.formats.FORMATS`)."""
    source: str
    """The path or hub name that was read."""
    n_read: int
    """Rows read, bad ones included."""
    n_skipped: int = 0
    """Bad rows dropped under `bad_rows="skip"`."""
    skipped: list[str] = field(default_factory=list)
    """The first few skip messages, each `location: reason`."""
    n_over_length: int = 0
    """Rows longer than `max_length` tokens (counted, not dropped); 0 without a tokenizer."""
    weight: float = 1.0
    """The part's mixing weight (`rows` are before weighting); 1 for a whole source."""
    parts: list[LoadResult] = field(default_factory=list)
    """For a mix of several parts: each part's own result; `rows` are then the weighted mix."""


class RowScanner:
    """Iterate `(location, normalized_row | DataError)` over a source.

    The format is fixed by the first row that normalizes cleanly (a broken first row does not decide
    it). `kind=None` picks the richest kind that format serves (preference, then sft, then prompt).
    While iterating, `format`, `kind` and `n_read` describe what was read so far.
    """

    def __init__(
        self, source: str | Part, kind: str | None, split: str = "train", *, streaming: bool = False
    ):
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.part = source if isinstance(source, Part) else Part(str(source))
        self.source, self.kind, self.split, self.streaming = self.part.path, kind, split, streaming
        self.format: str | None = None
        self.first_raw: dict | None = None
        """The first good row as read (keys renamed), which `rlhf data inspect` describes."""
        self.n_read = 0

    def _normalize(self, raw: dict, location: str) -> dict | DataError:
        """Normalize one raw row; raise only when the source's format cannot serve the kind."""
        try:
            raw = self.part.rename(raw, location)
            fmt = self.format or detect_format(raw, location)
        except DataError as err:
            return err
        kind = self.kind or next(k for k in ("preference", "sft", "prompt") if k in FORMAT_KINDS[fmt])
        if self.format is None:
            check_kind(fmt, kind, self.source)
        try:
            row = normalize_row(raw, fmt, kind, location)
        except DataError as err:
            return err
        if self.format is None:
            self.format, self.kind, self.first_raw = fmt, kind, raw
        return row

    def __iter__(self) -> Iterator[tuple[str, dict | DataError]]:
        for location, raw in read_records(self.source, self.split, streaming=self.streaming):
            self.n_read += 1
            yield location, raw if isinstance(raw, DataError) else self._normalize(raw, location)


def _conversation_tokens(tokenizer: Any, messages: list[dict], location: str) -> int:
    """Token count of a conversation rendered by the tokenizer's chat template.

    Without a chat template the message contents are joined with newlines and tokenized.
    """
    try:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, tokenize=True)
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages))
    except Exception as err:  # jinja templates raise their own errors, e.g. "roles must alternate"
        raise DataError(
            f"{location}: the tokenizer's chat template failed on this row ({err}); fix the row or the template"
        ) from None
    if not isinstance(ids, list):  # BatchEncoding / dict from transformers 5
        ids = ids["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return len(ids)


def token_length(row: dict, tokenizer: Any, location: str = "") -> int:
    """Tokens in prompt + response of a normalized row; for a pair, the longer side counts."""
    sides = [row[key] for key in ("completion", "chosen", "rejected") if key in row] or [[]]
    return max(_conversation_tokens(tokenizer, row["prompt"] + side, location) for side in sides)


def load(
    source: Any,
    kind: str,
    *,
    split: str = "train",
    bad_rows: str = "error",
    tokenizer: Any = None,
    max_length: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> LoadResult:
    """Read `source` and normalize every row for `kind` ("sft", "preference" or "prompt").

    `source` is a path, a `{path, weight, columns}` mapping or a list of them (`rlhf.data.sources`); the
    parts of a list are mixed by weight with `seed`. `bad_rows="error"` raises DataError on the first bad
    row; `"skip"` drops bad rows and counts them. With a tokenizer and `max_length`, rows longer than
    `max_length` tokens are counted (not dropped). `limit` stops each part after that many good rows.
    """
    results = load_parts(
        source, kind, split=split, bad_rows=bad_rows, tokenizer=tokenizer, max_length=max_length, limit=limit
    )
    if len(results) == 1 and results[0].weight == 1.0:
        return results[0]
    return LoadResult(
        rows=mix([r.rows for r in results], [r.weight for r in results], seed),
        format=" + ".join(r.format for r in results),
        source=label(source),
        n_read=sum(r.n_read for r in results),
        n_skipped=sum(r.n_skipped for r in results),
        skipped=[msg for r in results for msg in r.skipped][:MAX_SKIP_MESSAGES],
        n_over_length=sum(r.n_over_length for r in results),
        parts=results,
    )


def load_parts(source: Any, kind: str, **options: Any) -> list[LoadResult]:
    """`load_part` for each part of `source`, unweighted (each result carries its weight)."""
    return [load_part(part, kind, **options) for part in parts(source)]


def load_part(
    part: Part,
    kind: str,
    *,
    split: str = "train",
    bad_rows: str = "error",
    tokenizer: Any = None,
    max_length: int | None = None,
    limit: int | None = None,
) -> LoadResult:
    """Every row of one part, normalized for `kind` (see `load`), without its weight applied."""
    if bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"bad_rows must be one of {BAD_ROW_POLICIES}, got {bad_rows!r}")
    scanner = RowScanner(part, kind, split)
    result = LoadResult(rows=[], format="", source=part.path, n_read=0, weight=part.weight)
    count_length = tokenizer is not None and max_length is not None
    for location, row in scanner:
        if isinstance(row, DataError):
            if bad_rows == "error":
                raise row
            result.n_skipped += 1
            if len(result.skipped) < MAX_SKIP_MESSAGES:
                result.skipped.append(str(row))
            continue
        if count_length and token_length(row, tokenizer, location) > max_length:
            result.n_over_length += 1
        result.rows.append(row)
        if limit is not None and len(result.rows) >= limit:
            break
    if not result.rows:
        raise DataError(
            f"{part.path}: no valid rows ({result.n_skipped} bad rows skipped, first: {result.skipped[0]})"
        )
    result.format, result.n_read = scanner.format or "", scanner.n_read
    return result


def check_source(
    source: Any, kind: str, *, split: str = "train", sample: int = 50, bad_rows: str = "error"
) -> str:
    """Cheap preflight check: read up to `sample` rows of each part and return the detected format(s).

    Raises DataError when a part is unreadable, cannot serve `kind`, or (with `bad_rows="error"`)
    a sampled row is bad; with `"skip"`, only when no sampled row is good. Builds no `datasets.Dataset`
    for local files; hub datasets are streamed.
    """
    if bad_rows not in BAD_ROW_POLICIES:
        raise ValueError(f"bad_rows must be one of {BAD_ROW_POLICIES}, got {bad_rows!r}")
    return " + ".join(_check_part(part, kind, split, sample, bad_rows) for part in parts(source))


def _check_part(part: Part, kind: str, split: str, sample: int, bad_rows: str) -> str:
    scanner = RowScanner(part, kind, split, streaming=True)
    first_error, n_good = None, 0
    for _location, row in scanner:
        if isinstance(row, DataError):
            if bad_rows == "error":
                raise row
            first_error = first_error or row
        else:
            n_good += 1
        if scanner.n_read >= sample:
            break
    if n_good == 0:
        raise DataError(
            f"{part.path}: no valid row in the first {scanner.n_read} rows (first problem: {first_error})"
        )
    return scanner.format or ""
