"""`rlhf data inspect`: what a data source holds and what might be wrong with it.

The report covers the detected format, how its fields were read into the schema (and which of the
file's own keys `columns` renamed), the kinds it serves, row and bad-row counts (every bad row
up to a cap, without stopping at the first), example rows, length statistics, duplicates and, for
preference data, length bias in both directions (`rlhf.verbosity`): a reward model trained on pairs
where the chosen response is nearly always the longer one tends to learn "longer is better" (Singhal et
al. 2023, https://arxiv.org/abs/2310.03716), and one where it is nearly always the shorter one learns the
opposite; with margins, the correlation between length difference and margin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from rlhf import verbosity
from rlhf.data.formats import FORMAT_KINDS, describe
from rlhf.data.sources import n_taken, parts
from rlhf.data.stage_rows import data_source
from rlhf.data.validate import RowScanner
from rlhf.encoding import CHUNK_ROWS
from rlhf.errors import DataError
from rlhf.verbosity import LengthBias

MAX_BAD_ROWS = 20
EXAMPLE_CHARS = 160
RESPONSE_KEYS = ("completion", "chosen", "rejected")


@dataclass
class LengthStats:
    """Summary of a list of lengths."""

    min: float
    mean: float
    p50: float
    p95: float
    max: float

    @classmethod
    def of(cls, values: list[int]) -> LengthStats:
        """Stats of a non-empty list; percentiles interpolate linearly between ranks."""
        ordered = sorted(values)
        return cls(
            ordered[0],
            sum(ordered) / len(ordered),
            _percentile(ordered, 0.5),
            _percentile(ordered, 0.95),
            ordered[-1],
        )


def _percentile(ordered: list[int], q: float) -> float:
    """The q-quantile of sorted values (linear interpolation, as numpy's default)."""
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class InspectReport:
    """What `inspect` found in one source."""

    source: str
    format: str
    """Detected format, or "unknown" when no row could be recognized."""
    kinds: tuple[str, ...]
    """Kinds of stage data this format can serve ("sft", "preference", "prompt")."""
    n_rows: int
    """Valid rows."""
    n_read: int
    """Rows read, bad ones included."""
    n_bad: int
    bad_rows: list[str]
    """The first `MAX_BAD_ROWS` bad rows as `location: reason`."""
    examples: list[dict]
    """The first few normalized rows, long texts truncated."""
    length_unit: str
    """"tokens" (content only, no chat template) or "words" (whitespace-separated)."""
    lengths: dict[str, LengthStats]
    """Per field: "prompt" and "completion", or "prompt", "chosen" and "rejected"."""
    n_duplicates: int
    """Rows identical to an earlier row after normalization."""
    n_duplicate_prompts: int
    """Rows whose prompt appeared in an earlier row."""
    length_bias: LengthBias | None = None
    """Preference data: chosen vs rejected lengths in both directions, and against the margin."""
    warnings: list[str] = field(default_factory=list)
    layout: list[str] = field(default_factory=list)
    """How the detected format's fields became the schema (`formats.describe`), from the first good row."""
    columns: list[str] = field(default_factory=list)
    """`their key -> schema key` for each key the source's `columns` mapping renames."""
    weight: float = 1.0
    """The source's mixing weight."""


def _truncate(row: dict) -> dict:
    """A copy of a normalized row with each message's content cut to `EXAMPLE_CHARS`."""

    def cut(text: str) -> str:
        return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 3] + "..."

    return {
        key: [{"role": m["role"], "content": cut(m["content"])} for m in value]
        if isinstance(value, list)
        else value
        for key, value in row.items()
    }


def _lengths(texts: list[str], tokenizer: Any) -> list[int]:
    """`verbosity.response_length` of each text (its tokens under `tokenizer`, content only, or its words
    without one), the texts tokenized in one batched call: the fast tokenizers' batch path, where a call per
    text costs most of a large file's inspect time. The counts equal a call per text."""
    if tokenizer is None:
        return [verbosity.response_length(text) for text in texts]
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return [len(row) for row in ids]


def policy_tokenizer(cfg: Any) -> Any:
    """The tokenizer a config's policy trains with (`model.tokenizer`, else the model's own), for lengths in
    its tokens; None, so lengths are in words, when it cannot be had without building a model (an alias
    not built yet) or from a Hub that is offline with no cached copy."""
    from rlhf import models
    from rlhf.errors import ModelError
    from rlhf.models.aliases import ALIASES, cache_root, is_built

    name = cfg.model.tokenizer or cfg.model.name_or_path
    if name in ALIASES and not is_built(cache_root() / "models" / name):
        return None
    try:
        return models.load_tokenizer(models.resolve_model(name), trust_remote_code=cfg.model.trust_remote_code)
    except ModelError:
        return None


def _warnings(report: InspectReport) -> list[str]:
    """Plain-language warnings for the numbers in a report."""
    out = []
    if report.n_bad:
        out.append(f"{report.n_bad} bad rows (first: {report.bad_rows[0]}); fix them or set bad_rows: skip")
    if report.n_rows == 0:
        out.append("no valid rows; nothing in this source can be trained on")
    out += verbosity.warnings(report.length_bias)
    if report.n_duplicates:
        out.append(f"{report.n_duplicates} duplicate rows (identical after normalization); deduplicate them")
    return out


@dataclass
class _Tally:
    """Running counts while `inspect` reads a source.

    Lengths are measured `CHUNK_ROWS` rows at a time (`_lengths`: one batched tokenizer call per chunk): `add`
    keeps each row's texts until then, and `finish` measures the rest. A field of several messages measures
    as the sum of its messages' lengths (chosen and rejected are one assistant message each)."""

    tokenizer: Any
    n_examples: int
    n_rows: int = 0
    n_bad: int = 0
    n_duplicates: int = 0
    n_duplicate_prompts: int = 0
    bad: list[str] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    margins: list[float | None] = field(default_factory=list)
    seen_rows: set[str] = field(default_factory=set)
    seen_prompts: set[str] = field(default_factory=set)
    pending: list[tuple[str, int]] = field(default_factory=list)
    """(field, message count) of each row's message lists not measured yet, in row order."""
    texts: list[str] = field(default_factory=list)
    """Their messages' contents, in the same order."""
    n_pending: int = 0
    """Rows those come from."""

    def add(self, row: dict | DataError) -> None:
        """Count one normalized row or one bad row."""
        if isinstance(row, DataError):
            self.n_bad += 1
            if len(self.bad) < MAX_BAD_ROWS:
                self.bad.append(str(row))
            return
        self.n_rows += 1
        if len(self.examples) < self.n_examples:
            self.examples.append(_truncate(row))
        for key, msgs in row.items():
            if isinstance(msgs, list):  # not the pair's margin
                self.pending.append((key, len(msgs)))
                self.texts += [m["content"] for m in msgs]
        if "chosen" in row:
            self.margins.append(row.get("margin"))
        row_key, prompt_key = json.dumps(row, sort_keys=True), json.dumps(row["prompt"])
        self.n_duplicates += row_key in self.seen_rows
        self.n_duplicate_prompts += prompt_key in self.seen_prompts
        self.seen_rows.add(row_key)
        self.seen_prompts.add(prompt_key)
        self.n_pending += 1
        if self.n_pending == CHUNK_ROWS:
            self.finish()

    def finish(self) -> None:
        """Measure the rows `add` kept, appending to `lengths` in row order."""
        counts = iter(_lengths(self.texts, self.tokenizer))
        for key, n_messages in self.pending:
            self.lengths.setdefault(key, []).append(sum(next(counts) for _ in range(n_messages)))
        self.pending, self.texts, self.n_pending = [], [], 0


def inspect(
    source: Any,
    *,
    split: str = "train",
    tokenizer: Any = None,
    n_examples: int = 3,
    limit: int | None = None,
    kind: str | None = None,
    streaming: bool = False,
) -> InspectReport:
    """Read a whole source (or its first `limit` rows) and report on it without stopping at bad rows.

    `source` is one path or `{path, weight, columns}` mapping; `kind` reads it as a stage would (default:
    the richest kind its format serves); `streaming` streams hub datasets instead of loading them whole.
    Whole-source problems (missing or empty file, a JSON array in a .jsonl file) still raise DataError.
    """
    found = parts(source)
    if len(found) != 1:
        raise ValueError("inspect reads one source at a time; call it for each of `parts(source)`")
    scanner = RowScanner(found[0], kind, split, streaming=streaming)
    tally = _Tally(tokenizer=tokenizer, n_examples=n_examples)
    for _location, row in scanner:
        tally.add(row)
        if limit is not None and scanner.n_read >= limit:
            break
    tally.finish()
    fmt = scanner.format or "unknown"
    report = InspectReport(
        source=found[0].path,
        format=fmt,
        kinds=FORMAT_KINDS.get(fmt, ()),
        n_rows=tally.n_rows,
        n_read=scanner.n_read,
        n_bad=tally.n_bad,
        bad_rows=tally.bad,
        examples=tally.examples,
        length_unit="tokens" if tokenizer is not None else "words",
        lengths={key: LengthStats.of(values) for key, values in tally.lengths.items()},
        n_duplicates=tally.n_duplicates,
        n_duplicate_prompts=tally.n_duplicate_prompts,
        layout=describe(scanner.first_raw, fmt) if scanner.first_raw is not None else [],
        columns=found[0].mapped(),
        weight=found[0].weight,
    )
    if "chosen" in tally.lengths:
        report.length_bias = verbosity.length_bias(tally.lengths["chosen"], tally.lengths["rejected"], tally.margins,
                                                   unit=report.length_unit)
    report.warnings = _warnings(report)
    return report


def _stats_lines(report: InspectReport) -> list[str]:
    """The length table of a report."""
    unit = "tokens, content only" if report.length_unit == "tokens" else "whitespace-separated words"
    lines = [f"lengths ({unit}):", f"  {'':<12}{'min':>8}{'mean':>8}{'p50':>8}{'p95':>8}{'max':>8}"]
    for key, s in report.lengths.items():
        lines.append(f"  {key:<12}{s.min:>8.0f}{s.mean:>8.1f}{s.p50:>8.1f}{s.p95:>8.1f}{s.max:>8.0f}")
    return lines


def _example_line(i: int, row: dict) -> str:
    """One example row on one line: `[i] prompt: user: ... | chosen: ...`."""
    parts = []
    for key, msgs in row.items():
        if not isinstance(msgs, list):
            parts.append(f"{key}: {msgs:g}")
            continue
        text = " / ".join(f"{m['role']}: {m['content']}" for m in msgs) or "(empty)"
        parts.append(f"{key}: {text}".replace("\n", "\\n"))
    return f"  [{i}] " + " | ".join(parts)


def format_report(report: InspectReport) -> str:
    """The report as plain text for the terminal."""
    kinds = ", ".join(report.kinds) or "none"
    lines = [f"source: {report.source}", f"format: {report.format} (serves: {kinds})"]
    lines += [f"{'read as:' if i == 0 else '':<9}{line}" for i, line in enumerate(report.layout)]
    if report.columns:
        lines.append(f"columns: {', '.join(report.columns)}")
    lines.append(f"rows: {report.n_rows} valid of {report.n_read} read, {report.n_bad} bad")
    if report.lengths:
        lines += _stats_lines(report)
    lines.append(
        f"duplicates: {report.n_duplicates} identical rows, {report.n_duplicate_prompts} repeated prompts"
    )
    if report.length_bias is not None:
        lines.append(f"verbosity: {verbosity.describe(report.length_bias)}")
    if report.bad_rows:
        more = report.n_bad - len(report.bad_rows)
        lines += (
            ["bad rows:"]
            + [f"  {msg}" for msg in report.bad_rows]
            + ([f"  ... and {more} more"] if more else [])
        )
    if report.examples:
        lines += ["examples:"] + [_example_line(i, row) for i, row in enumerate(report.examples, start=1)]
    if report.warnings:
        lines += ["warnings:"] + [f"  - {w}" for w in report.warnings]
    return "\n".join(lines)


def mix_lines(name: str, reports: list[InspectReport]) -> list[str]:
    """What a split mixed from several sources (or one weighted source) holds: rows per source and share.

    The counts are those `rlhf.data.sources.mix` takes, before the held-out split.
    """
    taken = [n_taken(report.n_rows, report.weight) for report in reports]
    total = sum(taken)
    lines = [f"mix of {name}: {total} rows (before the held-out split)"]
    for report, n in zip(reports, taken, strict=True):
        share = n / total if total else 0.0
        lines.append(f"  {report.source}: {report.n_rows} rows x{report.weight:g} -> {n} ({share:.0%})")
    return lines


def config_sources(cfg: Any) -> list[tuple[str, str, Any]]:
    """(config key, kind, source) of every source a pipeline config's stages read, as preflight finds
    them (fallbacks included), each followed by its eval source when one is set."""
    out: list[tuple[str, str, Any]] = []
    for stage in cfg.stages:
        source, key, kind = data_source(cfg, stage)
        eval_key = f"{key}_eval"
        for name, found in ((key, source), (eval_key, getattr(cfg.data, eval_key.split(".")[-1], None))):
            if found is not None and (name, kind) not in [(n, k) for n, k, _ in out]:
                out.append((name, kind, found))
    return out
