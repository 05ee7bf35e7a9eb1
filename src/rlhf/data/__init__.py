"""Data layer: load any supported format, normalize it to one schema, validate, inspect.

Sources: JSONL, JSON, parquet, CSV, `datasets` save_to_disk dirs, hub dataset names. Formats:
prompt/completion, chat `messages`, prompt/chosen/rejected (plain or chat), implicit-prompt pairs,
Anthropic HH transcripts, prompt-only. Rows come out in TRL's conversational schema (see `formats`).

Importing this package imports neither torch, transformers nor datasets; tokenizers are passed in.
"""

from rlhf.data.formats import FORMAT_KINDS, FORMATS, KINDS, detect_format, normalize_row
from rlhf.data.loaders import iter_rows
from rlhf.data.report import InspectReport, LengthStats, format_report, inspect
from rlhf.data.validate import LoadResult, check_source, load, token_length

__all__ = [
    "FORMATS",
    "FORMAT_KINDS",
    "KINDS",
    "InspectReport",
    "LengthStats",
    "LoadResult",
    "check_source",
    "detect_format",
    "format_report",
    "inspect",
    "iter_rows",
    "load",
    "normalize_row",
    "token_length",
]
