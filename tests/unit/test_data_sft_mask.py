"""Multi-turn SFT: every assistant turn is trained, everything else is masked out of the loss."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from rlhf import data, models
from rlhf.stages.sft import encode_sft

FORMATS_DIR = Path(__file__).resolve().parents[1] / "data" / "formats"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))  # ChatML, EOS is <|im_end|>


def _runs(tokenizer, ids: list[int], mask: list[int]) -> list[tuple[int, str]]:
    """(mask bit, decoded text) of each run of equal mask bits."""
    runs = itertools.groupby(zip(ids, mask, strict=True), lambda pair: pair[1])
    return [(bit, tokenizer.decode([t for t, _ in run])) for bit, run in runs]


def test_sharegpt_conversation_masks_all_but_the_assistant_turns(tokenizer):
    row = data.load(str(FORMATS_DIR / "sharegpt.jsonl"), "sft").rows[0]
    [enc] = encode_sft(tokenizer, [row], 256, "sharegpt.jsonl")
    assert _runs(tokenizer, enc["input_ids"], enc["completion_mask"]) == [
        (0, "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        (1, "Hello!<|im_end|>\n"),  # the earlier reply, with its end-of-turn token: trained
        (0, "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"),
        (1, "Great, thanks.<|im_end|>"),  # the last reply, ending at EOS as PPO generates it
    ]


def test_single_turn_mask_is_the_reply_only(tokenizer):
    row = data.load(str(FORMATS_DIR / "alpaca.jsonl"), "sft").rows[0]
    [enc] = encode_sft(tokenizer, [row], 256, "alpaca.jsonl")
    runs = _runs(tokenizer, enc["input_ids"], enc["completion_mask"])
    assert [bit for bit, _ in runs] == [0, 1] and runs[1][1] == "Bonjour<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_falls_back_to_the_last_reply(tokenizer, caplog):
    rewriting = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    # Renders earlier assistant turns as "(earlier)" once a later turn exists, as reasoning templates
    # drop earlier thinking: a conversation's start then renders differently on its own.
    rewriting.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier){% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    row = data.load(str(FORMATS_DIR / "sharegpt.jsonl"), "sft").rows[0]
    [enc] = encode_sft(rewriting, [row], 256, "sharegpt.jsonl")
    assert [bit for bit, _ in _runs(rewriting, enc["input_ids"], enc["completion_mask"])] == [0, 1]
    assert "1 multi-turn rows train only their last reply" in caplog.text


def test_trl_turns_the_mask_into_labels(tokenizer, tiny_model_dir, tmp_path):
    """SFTTrainer keeps -100 labels outside the mask (pre-tokenized rows, completion_only_loss)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    row = data.load(str(FORMATS_DIR / "sharegpt.jsonl"), "sft").rows[0]
    [enc] = encode_sft(tokenizer, [row], 256, "sharegpt.jsonl")
    model = models.load_causal_lm(str(tiny_model_dir), tokenizer=tokenizer)
    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, max_length=256, report_to=[],
                     use_cpu=True, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([enc]), processing_class=tokenizer)
    labels = trainer.train_dataset[0]["labels"]
    assert labels == [t if m else -100 for t, m in zip(enc["input_ids"], enc["completion_mask"], strict=True)]
