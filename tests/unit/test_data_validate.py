"""load(): bad-row policies, validation messages with exact locations, length counting; check_source; tiny data."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from rlhf.data import check_source, inspect, load, token_length  # noqa: E402
from rlhf.errors import DataError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
BAD = ROOT / "tests" / "data" / "bad"
TINY = ROOT / "data" / "tiny"
# A chat template that renders each message as "<role> words... </s>", so with a whitespace
# word-level tokenizer a message of n words is n + 2 tokens.
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "</s>": 2, "<user>": 3, "<assistant>": 4, "<system>": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )
    tok.chat_template = TEMPLATE
    return tok


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("null_field.jsonl", "preference", ":2: field 'rejected' is null; give it a value or drop the row"),
        (
            "missing_field.jsonl",
            "preference",
            ":2: missing field 'rejected'; every 'preference' row needs it",
        ),
        ("empty_field.jsonl", "preference", ":3: field 'chosen' is empty; give it text or drop the row"),
        (
            "same_pair.jsonl",
            "preference",
            ":2: chosen and rejected are identical; a preference pair needs two different responses",
        ),
        (
            "wrong_type.jsonl",
            "preference",
            ":2: field 'chosen' is a number, expected a string or a list of messages",
        ),
        (
            "unknown_role.jsonl",
            "sft",
            ":2: unknown role 'bot' in messages[1]; use one of system, user, assistant",
        ),
        ("truncated.jsonl", "preference", ":3: not valid JSON (Unterminated string"),
        ("non_utf8.jsonl", "preference", ":2: not valid UTF-8 (byte 0xe9 at column 32)"),
        ("not_object.jsonl", "preference", ":2: row is a number, not an object"),
    ],
)
def test_bad_rows_error_names_file_and_line(name, kind, message):
    path = str(BAD / name)
    with pytest.raises(DataError) as info:
        load(path, kind)
    assert str(info.value).startswith(path + message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "kind", "n_good", "line"),
    [
        ("null_field.jsonl", "preference", 1, 2),
        ("empty_field.jsonl", "preference", 2, 3),
        ("same_pair.jsonl", "preference", 1, 2),
        ("wrong_type.jsonl", "preference", 1, 2),
        ("unknown_role.jsonl", "sft", 1, 2),
        ("truncated.jsonl", "preference", 2, 3),
        ("non_utf8.jsonl", "preference", 1, 2),
    ],
)
def test_bad_rows_skip_counts(name, kind, n_good, line):
    path = str(BAD / name)
    result = load(path, kind, bad_rows="skip")
    assert (len(result.rows), result.n_skipped, result.n_read) == (n_good, 1, n_good + 1)
    assert result.skipped[0].startswith(f"{path}:{line}: ")


def test_skip_keeps_first_five_messages_and_counts_all(tmp_path):
    rows = [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 8 + [
        {"prompt": "q", "chosen": "a", "rejected": "b"}
    ]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    result = load(path, "preference", bad_rows="skip")
    assert (result.n_skipped, len(result.skipped), len(result.rows)) == (8, 5, 1)
    assert [m.split(": ")[0] for m in result.skipped] == [f"{path}:{i}" for i in range(1, 6)]


def test_all_rows_bad_under_skip_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}])
    with pytest.raises(
        DataError, match=r"p\.jsonl: no valid rows \(1 bad rows skipped, first: .*p\.jsonl:1: chosen and"
    ):
        load(path, "preference", bad_rows="skip")


def test_unrecognized_first_row_is_a_row_error_and_detection_uses_next(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"text": "x"}, {"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: unrecognized row keys \(text\)"):
        load(path, "sft")
    result = load(path, "sft", bad_rows="skip")
    assert (result.format, len(result.rows), result.n_skipped) == ("prompt_completion", 1, 1)


def test_limit_stops_after_good_rows():
    result = load(str(TINY / "preference.jsonl"), "preference", limit=10)
    assert len(result.rows) == 10 and result.n_read == 10


def test_over_length_is_counted_not_dropped(tmp_path, tokenizer):
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    rows = [
        {"prompt": "q", "chosen": words(1), "rejected": "r"},  # user 3 + chosen 3 = 6 tokens
        {"prompt": "q", "chosen": words(5), "rejected": "r"},  # 3 + 7 = 10: not over 10
        {"prompt": "q", "chosen": words(6), "rejected": "r"},  # 3 + 8 = 11: over
        {"prompt": "q", "chosen": "c", "rejected": words(9)},  # the longer side counts: 3 + 11 = 14
    ]
    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    result = load(path, "preference", tokenizer=tokenizer, max_length=10)
    assert (len(result.rows), result.n_over_length) == (4, 2)
    assert load(path, "preference", tokenizer=tokenizer).n_over_length == 0
    sft = load(path, "sft", tokenizer=tokenizer, max_length=10)  # sft uses chosen only
    assert sft.n_over_length == 1
    assert token_length(sft.rows[2], tokenizer) == 11


def test_token_length_handles_list_dict_and_no_template(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "a b"}],
        "completion": [{"role": "assistant", "content": "c"}],
    }

    class ListTok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize):
            return list(range(7))

    class DictTok(ListTok):
        def apply_chat_template(self, messages, tokenize):
            return {"input_ids": [list(range(9))], "attention_mask": [[1] * 9]}

    assert token_length(row, ListTok()) == 7
    assert token_length(row, DictTok()) == 9
    assert token_length(row, tokenizer) == 4 + 3
    plain = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]")
    plain.chat_template = None
    assert token_length(row, plain) == 3  # "a b\nc" -> 3 words, no template tokens


def test_broken_chat_template_is_a_row_error(tmp_path, tokenizer):
    broken = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]")
    broken.chat_template = "{{ raise_exception('roles must alternate') }}"
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(
        DataError,
        match=r"p\.jsonl:1: the tokenizer's chat template failed on this row \(.*roles must alternate",
    ):
        load(path, "sft", tokenizer=broken, max_length=5)


def test_check_source(tmp_path):
    assert check_source(str(TINY / "preference.jsonl"), "preference") == "preference"
    assert check_source(str(TINY / "sft.jsonl"), "sft") == "prompt_completion"
    assert check_source(str(TINY / "prompts.jsonl"), "prompt") == "prompt_only"
    with pytest.raises(DataError, match="format 'prompt_completion' has no chosen/rejected pairs"):
        check_source(str(TINY / "sft.jsonl"), "preference")
    with pytest.raises(DataError, match=r"same_pair\.jsonl:2: chosen and rejected are identical"):
        check_source(str(BAD / "same_pair.jsonl"), "preference")
    assert check_source(str(BAD / "same_pair.jsonl"), "preference", bad_rows="skip") == "preference"
    good = [{"prompt": "q", "completion": "a"}] * 5
    path = _write_jsonl(tmp_path / "p.jsonl", good + [{"prompt": "q", "completion": None}])
    assert check_source(path, "sft", sample=5) == "prompt_completion"  # the bad 6th row is not sampled
    with pytest.raises(DataError, match=r"p\.jsonl:6: field 'completion' is null"):
        check_source(path, "sft", sample=6)
    with pytest.raises(DataError, match=r": no such file$"):
        check_source(str(tmp_path / "missing.jsonl"), "sft")


def test_import_and_local_checks_stay_light():
    code = (
        "import sys\n"
        "import rlhf.data as d\n"
        "heavy = ('torch', 'transformers', 'datasets', 'deepspeed')\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        f"d.check_source({str(TINY / 'preference.jsonl')!r}, 'preference')\n"
        f"d.load({str(TINY / 'sft.jsonl')!r}, 'sft')\n"
        f"d.inspect({str(TINY / 'preference.jsonl')!r})\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tiny_sets_load_and_are_deterministic(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tiny", TINY / "make_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(tmp_path)
    for name in ("sft.jsonl", "preference.jsonl", "prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), (
            f"rerun data/tiny/make_tiny.py ({name})"
        )
    assert len(load(str(TINY / "sft.jsonl"), "sft").rows) == 64
    assert len(load(str(TINY / "preference.jsonl"), "preference").rows) == 128
    assert len(load(str(TINY / "prompts.jsonl"), "prompt").rows) == 32


def test_tiny_preference_is_separable_by_content_not_length():
    rows = load(str(TINY / "preference.jsonl"), "preference").rows
    good, bad = {"glad", "great", "happy"}, {"no", "bad", "whatever"}

    def words(msg):
        return set(msg[0]["content"].lower().replace(".", " ").replace(",", " ").replace("!", " ").split())

    assert all(words(r["chosen"]) & good and not words(r["chosen"]) & bad for r in rows)
    assert all(words(r["rejected"]) & bad and not words(r["rejected"]) & good for r in rows)
    assert (
        max(len(r["chosen"][0]["content"].split() + r["rejected"][0]["content"].split()) for r in rows) < 30
    )


def test_inspect_counts_tokens_with_a_tokenizer(tokenizer):
    report = inspect(str(TINY / "sft.jsonl"), tokenizer=tokenizer)
    assert report.length_unit == "tokens"
    words = inspect(str(TINY / "sft.jsonl"))
    # content-only token counts equal whitespace word counts for this word-level tokenizer
    assert report.lengths["completion"] == words.lengths["completion"]


def test_format_is_fixed_by_the_first_valid_row(tmp_path):
    # the broken first row would look like plain implicit pairs; the HH rows after it decide the format
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: glad to help", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    path = _write_jsonl(tmp_path / "h.jsonl", [{"chosen": None, "rejected": "x"}, hh, hh])
    result = load(path, "preference", bad_rows="skip")
    assert (result.format, len(result.rows), result.n_skipped) == ("hh_rlhf", 2, 1)
    assert result.rows[0]["prompt"] == [{"role": "user", "content": "hi"}]
