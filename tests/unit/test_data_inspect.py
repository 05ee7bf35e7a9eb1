"""inspect(): counts, bad rows without stopping, lengths, duplicates, verbosity bias; format_report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data import format_report, inspect
from rlhf.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "data" / "tiny"
BAD = ROOT / "tests" / "data" / "bad"


def _write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _verbose_pairs(n: int, n_chosen_shorter: int) -> list[dict]:
    """n pairs; chosen has 6 words vs 3, except `n_chosen_shorter` pairs where it has 2."""
    rows = []
    for i in range(n):
        chosen = "sure glad to help you today" if i >= n_chosen_shorter else "glad to"
        rows.append({"prompt": f"question {i}", "chosen": chosen, "rejected": "no thanks bye"})
    return rows


def test_verbosity_bias_warning(tmp_path):
    path = _write_jsonl(tmp_path / "v.jsonl", _verbose_pairs(20, 1))
    report = inspect(path)
    assert report.length_bias.chosen_longer == pytest.approx(0.95)
    # mean lengths: chosen (19 * 6 + 2) / 20 = 5.8 words, rejected 3
    assert report.length_bias.length_ratio == pytest.approx(5.8 / 3)
    bias = [w for w in report.warnings if w.startswith("verbosity bias")]
    assert bias == [
        "verbosity bias: chosen is longer in 95% of pairs and 1.93x the rejected length on average (+2.8 words); "
        "a reward model trained on this may learn 'longer is better' (warned at >= 75% of pairs with a mean "
        "length ratio >= 1.10)"
    ]


def test_no_verbosity_warning_below_threshold(tmp_path):
    report = inspect(_write_jsonl(tmp_path / "v.jsonl", _verbose_pairs(20, 6)))  # 70% longer
    assert report.length_bias.chosen_longer == pytest.approx(0.7)
    assert not any(w.startswith("verbosity bias") for w in report.warnings)


def test_tiny_preference_report_is_clean():
    report = inspect(str(TINY / "preference.jsonl"))
    assert (report.format, report.n_rows, report.n_bad, report.n_read) == ("preference", 128, 0, 128)
    assert report.kinds == ("sft", "preference", "prompt")
    assert report.length_bias.chosen_longer < 0.5
    assert report.length_bias.length_ratio == pytest.approx(1.0, abs=0.1)
    assert report.warnings == []
    assert report.length_unit == "words"
    assert set(report.lengths) == {"prompt", "chosen", "rejected"}
    assert (report.n_duplicates, report.n_duplicate_prompts) == (0, 0)


def test_bad_rows_collected_without_stopping(tmp_path):
    good = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    rows = [good] + [{"prompt": "q", "chosen": None, "rejected": "no"}] * 25 + [good]
    path = _write_jsonl(tmp_path / "b.jsonl", rows)
    report = inspect(path)
    assert (report.n_rows, report.n_bad, len(report.bad_rows)) == (2, 25, 20)
    assert report.bad_rows[0] == f"{path}:2: field 'chosen' is null; give it a value or drop the row"
    assert report.bad_rows[19].startswith(f"{path}:21: ")
    assert report.warnings[0].startswith(f"25 bad rows (first: {path}:2: field 'chosen' is null")
    text = format_report(report)
    assert "  ... and 5 more" in text


def test_mixed_unreadable_lines_are_all_reported():
    report = inspect(str(BAD / "truncated.jsonl"))
    assert (report.n_rows, report.n_bad) == (2, 1)
    assert report.bad_rows[0].startswith(f"{BAD / 'truncated.jsonl'}:3: not valid JSON")


def test_whole_file_problems_still_raise():
    with pytest.raises(DataError, match="looks like a JSON array"):
        inspect(str(BAD / "array.jsonl"))
    with pytest.raises(DataError, match="no rows; the file is empty"):
        inspect(str(BAD / "empty.jsonl"))


def test_duplicates_lengths_and_examples(tmp_path):
    rows = [
        {"prompt": "a b", "completion": "one"},
        {"prompt": "a b", "completion": "one"},
        {"prompt": "a b", "completion": "one two three"},
        {"prompt": "c", "completion": "x" * 500},
    ]
    report = inspect(_write_jsonl(tmp_path / "s.jsonl", rows), n_examples=2)
    assert (report.format, report.n_duplicates, report.n_duplicate_prompts) == ("prompt_completion", 1, 2)
    assert any(w.startswith("1 duplicate rows") for w in report.warnings)
    stats = report.lengths["completion"]
    assert (stats.min, stats.max, stats.mean, stats.p50) == (1, 3, 1.5, 1.0)
    assert stats.p95 == pytest.approx(2.7)  # between 1 (rank 2) and 3 (rank 3): 1 + 2 * 0.85
    assert len(report.examples) == 2
    long = inspect(_write_jsonl(tmp_path / "l.jsonl", rows[3:])).examples[0]["completion"][0]["content"]
    assert len(long) == 160 and long.endswith("...")
    assert report.length_bias is None  # not preference data


def test_no_valid_rows_gives_unknown_format(tmp_path):
    report = inspect(_write_jsonl(tmp_path / "u.jsonl", [{"text": "a"}, {"text": "b"}]))
    assert (report.format, report.kinds, report.n_rows, report.n_bad) == ("unknown", (), 0, 2)
    assert "no valid rows; nothing in this source can be trained on" in report.warnings
    format_report(report)


def test_format_report_text():
    text = format_report(inspect(str(TINY / "preference.jsonl"), n_examples=1))
    lines = text.splitlines()
    assert lines[0] == f"source: {TINY / 'preference.jsonl'}"
    assert lines[1] == "format: preference (serves: sft, preference, prompt)"
    assert lines[2] == "read as: prompt -> prompt; chosen, rejected -> replies"
    assert lines[3] == "rows: 128 valid of 128 read, 0 bad"
    assert "lengths (whitespace-separated words):" in lines
    assert any(line.startswith("verbosity: chosen longer in") for line in lines)
    assert any(line.startswith("  [1] prompt: user: ") for line in lines)
    assert "warnings:" not in lines


def test_limit_reads_only_the_first_rows():
    assert inspect(str(TINY / "sft.jsonl"), limit=5).n_read == 5


FORMATS = ROOT / "tests" / "data" / "formats"


def test_report_shows_the_layout_and_the_margin_it_read():
    report = inspect(str(FORMATS / "ultrafeedback.jsonl"))
    assert report.format == "preference_conversation"
    lines = format_report(report).splitlines()
    assert lines[2].startswith("read as: chosen/rejected whole conversations that repeat the prompt: repeated turns "
                               "stripped")
    assert lines[3] == "         score_chosen - score_rejected -> pair margin (reward.margin)"
    assert "| margin: 3.5" in format_report(report)


def test_report_shows_what_columns_renamed(tmp_path):
    path = _write_jsonl(tmp_path / "se.jsonl", [{"question": "q", "response_j": "yes", "response_k": "no"}])
    unmapped = inspect(path)
    assert unmapped.format == "unknown" and unmapped.bad_rows[0].startswith(f"{path}:1: unrecognized row keys")
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    report = inspect({"path": path, "columns": columns})
    assert (report.format, report.n_rows) == ("preference", 1)
    assert "columns: question -> prompt, response_j -> chosen, response_k -> rejected" in format_report(report)


def test_cli_inspects_every_configured_source_and_the_mix(tmp_path, capsys):
    from rlhf import cli

    config = tmp_path / "c.yaml"
    config.write_text(
        "final_stage: dpo\ndata:\n"
        f"  sft:\n    - {{path: {FORMATS / 'sharegpt.jsonl'}, weight: 2}}\n    - {FORMATS / 'alpaca.jsonl'}\n"
        f"  preference: {FORMATS / 'ultrafeedback.jsonl'}\n"
    )
    assert cli.main(["data", "inspect", "--config", str(config), "-n", "0"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("==")]
    assert headers == ["== data.sft[0], read as sft ==", "== data.sft[1], read as sft ==",
                       "== data.preference, read as preference =="]
    assert "format: sharegpt (serves: sft, prompt)" in out and "format: alpaca (serves: sft, prompt)" in out
    assert (f"mix of data.sft: 6 rows (before the held-out split)\n  {FORMATS / 'sharegpt.jsonl'}: 2 rows x2 -> 4 (67%)\n"
            f"  {FORMATS / 'alpaca.jsonl'}: 2 rows x1 -> 2 (33%)") in out
    assert cli.main(["data", "inspect", str(FORMATS / "alpaca.jsonl"), "--columns", "prompt"]) == 2
    assert capsys.readouterr().err.strip() == "error: --columns: expected KEY=THEIRS, e.g. --columns prompt=question"


class _CountingTokenizer:
    """A tokenizer that records how many texts each call got."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.calls.append(len(texts) if isinstance(texts, list) else 1)
        return self.tokenizer(texts, **kwargs)


def test_token_lengths_come_from_batched_calls_and_equal_one_call_per_text(tmp_path, rlhf_cache, monkeypatch):
    from rlhf import models, verbosity
    from rlhf.data import LengthStats, load, report

    tokenizer = models.load_tokenizer(models.resolve_model("tiny-random"))
    turns = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me a story."},
             {"role": "assistant", "content": "Once upon a time."}, {"role": "user", "content": "Go on."}]
    rows = [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": turns, "chosen": [{"role": "assistant", "content": "and then a dragon came " * 150}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": "naïve café 東京 🚀?", "chosen": "Ça va très bien, merci 🙂", "rejected": "?"},
        {"prompt": "q", "chosen": None, "rejected": "no"},  # bad: counted, not measured
        {"prompt": "tabs\tand\n\nnewlines", "chosen": "a\n\n  b\tc  ", "rejected": "x" * 3000},
        {"prompt": "Why?", "chosen": "Because it is so.", "rejected": "Dunno", "score_chosen": 8, "score_rejected": 2},
        {"prompt": "Where?", "chosen": "Here", "rejected": "Over there, far away", "score_chosen": 5,
         "score_rejected": 4.5},
        {"prompt": "When?", "chosen": "Now, " * 40, "rejected": "Later.", "score_chosen": 9, "score_rejected": 1},
    ]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    monkeypatch.setattr(report, "CHUNK_ROWS", 3)  # 7 good rows: chunks of 3, 3 and 1
    counting = _CountingTokenizer(tokenizer)
    got = inspect(path, tokenizer=counting)

    good = load(path, "preference", bad_rows="skip").rows
    per_row = {key: [sum(verbosity.response_length(m["content"], tokenizer) for m in row[key]) for row in good]
               for key in ("prompt", "chosen", "rejected")}
    assert len(set(per_row["chosen"])) > 4 and max(per_row["rejected"]) > 1000  # varied, and past any model limit
    assert (got.n_rows, got.n_bad, got.length_unit) == (7, 1, "tokens")
    assert got.lengths == {key: LengthStats.of(values) for key, values in per_row.items()}
    assert got.length_bias == verbosity.length_bias(per_row["chosen"], per_row["rejected"],
                                                    [row.get("margin") for row in good], unit="tokens")
    assert got.length_bias.n_margins == 3
    # one call per chunk, with every message of its rows (row 2's prompt has 4)
    assert counting.calls == [3 + 3 + 6, 3 + 3 + 3, 3]
