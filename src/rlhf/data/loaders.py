"""Loaders: read raw rows from JSONL, JSON, parquet, CSV, `save_to_disk` dirs or a hub dataset name.

`read_records` is the core: it yields `(location, row)` where `row` is either a dict or, for a row that
cannot be read (bad JSON, bad UTF-8, not an object), the `DataError` for it, so that callers can skip
bad rows or collect them. Errors about the whole source (missing file, empty file, a JSON array in a
.jsonl file) are raised. `iter_rows` is the strict public form that raises on the first bad row.

Locations are `path:LINE` (1-based physical line) for JSONL and CSV, `path:row N` (1-based) otherwise.
`datasets` and `pyarrow` are imported inside functions so that `import rlhf.data` stays light.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf.data.chat import json_type
from rlhf.errors import DataError

Record = tuple[str, "dict | DataError"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# Suffixes that make a missing source clearly a file path rather than a hub dataset name.
FILE_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip")
_BOM = b"\xef\xbb\xbf"
# Keys that mark a JSON object as one row rather than a wrapper such as {"data": [...]}.
_ROW_KEYS = {
    "prompt",
    "completion",
    "response",
    "messages",
    "conversations",
    "instruction",
    "chosen",
    "rejected",
}


def iter_rows(source: str, split: str = "train") -> Iterator[tuple[str, dict]]:
    """Yield `(location, raw_row)` for every row of `source`; raise DataError on the first bad row."""
    for location, row in read_records(source, split):
        if isinstance(row, DataError):
            raise row
        yield location, row


def read_records(source: str, split: str = "train", *, streaming: bool = False) -> Iterator[Record]:
    """Yield `(location, dict | DataError)` for every row of `source` (see module docstring).

    `streaming` only affects hub datasets (used by cheap checks that read a few rows).
    """
    empty = True
    for record in _dispatch(str(source), split, streaming):
        empty = False
        yield record
    if empty:
        what = "file" if Path(source).expanduser().is_file() else "dataset"
        raise DataError(f"{source}: no rows; the {what} is empty")


def _dispatch(source: str, split: str, streaming: bool) -> Iterator[Record]:
    """Pick the reader for `source` by what it is on disk, or fall back to the dataset hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved(path, source, split)
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
        if suffix in JSONL_SUFFIXES:
            return _read_jsonl(path, source)
        if suffix in readers:
            return readers[suffix](path, source)
        raise DataError(f"{source}: unsupported file type '{suffix}'; use .jsonl, .json, .parquet or .csv")
    if _looks_like_path(source, path):
        raise DataError(f"{source}: no such file")
    return _read_hub(source, split, streaming)


def _looks_like_path(source: str, path: Path) -> bool:
    """True for a name that can only be a local path (a hub name is `name` or `org/name`)."""
    if path.suffix.lower() in FILE_SUFFIXES or source.startswith(("/", ".", "~")) or "\\" in source:
        return True
    return source.count("/") > 1 or (source.count("/") == 1 and path.parent.is_dir())


def _not_object(location: str, value: Any) -> DataError:
    """The row error for a JSON value that is not an object."""
    return DataError(f"{location}: row is {json_type(value)}, not an object; each row must be a JSON object")


def _utf8_error(location: str, err: UnicodeDecodeError, line_start: int = 0) -> DataError:
    """The error for undecodable bytes; `line_start` is the offset of the line within `err.object`."""
    byte = err.object[err.start]
    column = err.start - line_start + 1
    return DataError(
        f"{location}: not valid UTF-8 (byte 0x{byte:02x} at column {column}); re-encode the file as UTF-8"
    )


def _read_jsonl(path: Path, source: str) -> Iterator[Record]:
    """JSON Lines: one object per line; CRLF and a UTF-8 BOM are accepted, blank lines skipped."""
    with open(path, "rb") as f:
        first = True
        for lineno, raw in enumerate(f, start=1):
            location = f"{source}:{lineno}"
            if lineno == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                yield location, _utf8_error(location, err)
                continue
            if not text:
                continue
            if first and text.startswith("["):
                raise DataError(
                    f"{location}: looks like a JSON array, not JSON Lines; rename the file to .json "
                    "or write one JSON object per line"
                )
            first = False
            yield location, _parse_line(text, location)


def _parse_line(text: str, location: str) -> dict | DataError:
    """Parse one JSON Lines line into a row, or return the error for it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return DataError(
            f"{location}: not valid JSON ({err.msg}: column {err.colno}); each line must be one JSON object"
        )
    return value if isinstance(value, dict) else _not_object(location, value)


def _decode(path: Path, source: str) -> str:
    """Read a whole text file as UTF-8 (BOM allowed); undecodable bytes raise with line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        lineno = data.count(b"\n", 0, err.start) + 1
        raise _utf8_error(f"{source}:{lineno}", err, line_start) from None


def _read_json(path: Path, source: str) -> Iterator[Record]:
    """A JSON array of objects, an object holding one list of rows, or JSON Lines in a .json file."""
    text = _decode(path, source)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        lines = [line for line in text.splitlines() if line.strip()]
        if text.lstrip().startswith("{") and len(lines) > 1:
            return _read_jsonl(path, source)
        raise DataError(
            f"{source}:{err.lineno}: not valid JSON ({err.msg}: column {err.colno}); "
            "fix the file, or write it as JSON Lines (.jsonl)"
        ) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if _ROW_KEYS & value.keys():
            value = [value]
        elif len(lists) == 1:
            value = lists[0]
        else:
            raise DataError(
                f"{source}: a JSON object with {len(lists)} list values; write an array of row objects "
                'or an object with a single list of rows such as {"data": [...]}'
            )
    if not isinstance(value, list):
        raise DataError(f"{source}: the JSON value is {json_type(value)}; write an array of row objects")
    return _rows_of(value, source)


def _rows_of(values: Any, source: str) -> Iterator[Record]:
    """Yield `path:row N` records from an iterable of decoded row values."""
    for i, value in enumerate(values, start=1):
        location = f"{source}:row {i}"
        yield location, value if isinstance(value, dict) else _not_object(location, value)


def _read_parquet(path: Path, source: str) -> Iterator[Record]:
    """Parquet rows via pyarrow, read in batches so large files stream."""
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt or foreign file
        raise DataError(
            f"{source}: not a readable parquet file ({err}); check the file or convert it to .jsonl"
        ) from None
    batches = (row for batch in pfile.iter_batches(batch_size=1024) for row in batch.to_pylist())
    return _rows_of(batches, source)


def _csv_cell(cell: str) -> Any:
    """A CSV cell; a cell holding a JSON list or object (e.g. a chat column) is parsed as JSON."""
    if cell.lstrip().startswith(("[", "{")):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell
    return cell


def _read_csv(path: Path, source: str) -> Iterator[Record]:
    """CSV with a header row; the location is the physical line where each row starts."""
    reader = csv.reader(io.StringIO(_decode(path, source), newline=""))
    header = next(reader, None)
    if header is None:
        return
    end = reader.line_num
    for cells in reader:
        location, end = f"{source}:{end + 1}", reader.line_num
        if not cells:
            continue
        if len(cells) != len(header):
            yield (
                location,
                DataError(
                    f"{location}: {len(cells)} cells but the header has {len(header)} columns; "
                    "quote cells that contain commas or line breaks"
                ),
            )
            continue
        yield location, {key: _csv_cell(cell) for key, cell in zip(header, cells, strict=True)}


def _read_saved(path: Path, source: str, split: str) -> Iterator[Record]:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(
            f"{source}: a directory, but not one written by datasets save_to_disk ({err}); "
            "give a .jsonl/.json/.parquet/.csv file or a save_to_disk directory"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            available = ", ".join(loaded) or "none"
            raise DataError(
                f"{source}: no split '{split}' (available splits: {available}); set the split to one of them"
            )
        loaded = loaded[split]
    return _rows_of(loaded, source)


def _read_hub(name: str, split: str, streaming: bool) -> Iterator[Record]:
    """A dataset on the Hugging Face hub (works only when online or cached)."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as err:  # network, auth, missing split, missing config: all mean "cannot use this"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"'{name}' is not a local file or directory and could not be loaded from the dataset hub ({reason}); "
            "give a path to a .jsonl/.json/.parquet/.csv file or a save_to_disk directory"
        ) from None
    return _rows_of(loaded, name)
