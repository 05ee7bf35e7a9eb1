"""Data layer: load any supported format, normalize it to one schema, validate, inspect.

Sources: JSONL, JSON, parquet, CSV, `datasets` save_to_disk dirs, hub dataset names; a split may mix
several, and `columns` maps a file's own key names onto the schema (`sources`). Formats:
prompt/completion, chat `messages`, ShareGPT `conversations`, Alpaca, prompt/chosen/rejected (plain,
chat, or UltraFeedback-style conversations that repeat the prompt), implicit-prompt pairs, Anthropic HH
transcripts, prompt-only. Rows come out in TRL's conversational schema (see `formats`).

Importing this package imports neither torch, transformers nor datasets; tokenizers are passed in.
"""

from rlhf.data.formats import FORMAT_KINDS, FORMATS, KINDS, detect_format, normalize_row
from rlhf.data.loaders import iter_rows
from rlhf.data.report import InspectReport, LengthStats, config_sources, format_report, inspect, mix_lines
from rlhf.data.sources import Part, label, mix, parts
from rlhf.data.stage_rows import STAGE_DATA, data_source, load_rows, split_rows
from rlhf.data.validate import LoadResult, check_source, load, load_parts, token_length

__all__ = [
    "FORMATS",
    "FORMAT_KINDS",
    "KINDS",
    "InspectReport",
    "LengthStats",
    "LoadResult",
    "Part",
    "STAGE_DATA",
    "check_source",
    "config_sources",
    "data_source",
    "detect_format",
    "format_report",
    "inspect",
    "iter_rows",
    "label",
    "load",
    "load_parts",
    "load_rows",
    "mix",
    "mix_lines",
    "normalize_row",
    "parts",
    "split_rows",
    "token_length",
]
