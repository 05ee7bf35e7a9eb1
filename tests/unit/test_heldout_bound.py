"""The held-out set of a stage (`rlhf.heldout.select`): at most `data.eval_max_rows` rows, a sample seeded by
`run.seed`, of the rows within `data.max_length` as training's encoder decides; and the batched encoding
(`encoding.encode_batch` / `encoded_dataset`) that gives the same ids as encoding row by row."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rlhf import encoding, heldout, models
from rlhf.config import config_from_dict
from rlhf.data import load_rows
from rlhf.errors import ConfigError, DataError
from rlhf.stages import dpo, orpo, reward, sft

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir))


def _pairs(n: int, long_every: int = 3) -> list[dict]:
    """`n` pairs; every `long_every`-th one has a chosen reply far over MAX_LENGTH tokens."""
    rows = []
    for i in range(n):
        chosen = f"Answer {i}: the cat reads a long letter." * (40 if i % long_every == 0 else 1)
        rows.append({"prompt": f"Question {i}?", "chosen": chosen, "rejected": f"No idea {i}."})
    return rows


def _cfg(tmp_path: Path, rows: list[dict], **data) -> object:
    """A reward run whose held-out pairs are `rows`, written as their own file (data.preference_eval)."""
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _pairs(4)))
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return config_from_dict({"run": {"output_dir": str(tmp_path / "runs"), "seed": data.pop("seed", 0)},
                             "data": {"preference": str(train), "preference_eval": str(held),
                                      "max_length": MAX_LENGTH, **data}}, source="t.yaml")


def _reward_encoder(tokenizer):
    return lambda rows: reward.encode_pairs(tokenizer, rows, MAX_LENGTH, "held.jsonl", use_margin=False)


def test_a_50_row_heldout_file_with_eval_max_rows_10_checks_10_seeded_rows_within_max_length(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, _pairs(50), eval_max_rows=10)
    _, eval_rows, _ = load_rows(cfg, "reward", "preference")
    assert len(eval_rows) == 50
    rows, items = heldout.select(eval_rows, _reward_encoder(tokenizer), cfg, "reward")
    assert len(rows) == len(items) == 10
    # Left out exactly as training leaves out: the reward encoder's None rows (every third one is too long).
    fits = [item is not None for item in reward.encode_pairs(tokenizer, eval_rows, MAX_LENGTH, "x", False)]
    assert fits.count(False) == 17
    picked = [eval_rows.index(r) for r in rows]
    assert all(fits[i] for i in picked) and picked == sorted(picked)  # file order
    for row, item in zip(rows, items, strict=True):  # each item is the row's own training encoding
        ids, _ = encoding.encode(tokenizer, row["prompt"], encoding.content(row["chosen"]), MAX_LENGTH)
        assert item["chosen_ids"] == ids
    # Seeded by run.seed: the same seed picks the same rows, another seed others.
    again, _ = heldout.select(eval_rows, _reward_encoder(tokenizer), cfg, "reward")
    other, _ = heldout.select(eval_rows, _reward_encoder(tokenizer), _cfg(tmp_path, _pairs(50), eval_max_rows=10,
                                                                         seed=1), "reward")
    assert again == rows and other != rows
    # The sample is the first 10 fitting rows of the seed's shuffled order.
    order = list(range(50))
    random.Random(0).shuffle(order)
    assert picked == sorted([i for i in order if fits[i]][:10])


@pytest.mark.parametrize("stage", ["reward", "orpo", "dpo", "sft"])
def test_without_a_bound_the_heldout_set_is_every_row_training_would_keep(tmp_path, tokenizer, stage):
    pairs = _pairs(12, long_every=4)
    cfg = _cfg(tmp_path, pairs, eval_max_rows=None)
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}],
             "completion": [{"role": "assistant", "content": p["chosen"]}]} for p in pairs]
    encoders = {"reward": _reward_encoder(tokenizer),
                "orpo": lambda r: orpo.encode_pairs(tokenizer, r, MAX_LENGTH, "x"),
                "dpo": lambda r: dpo.fitting_pairs(tokenizer, r, MAX_LENGTH),
                "sft": lambda r: sft.encode_sft(tokenizer, r, MAX_LENGTH, "x")}
    kept, _ = heldout.select(rows, encoders[stage], cfg, stage)
    assert kept == [r for i, r in enumerate(rows) if i % 4]  # rows 0, 4, 8 have a reply over MAX_LENGTH


def test_a_heldout_file_with_no_row_within_max_length_is_a_one_line_error(tmp_path, tokenizer):
    cfg = _cfg(tmp_path, _pairs(3, long_every=1), eval_max_rows=2)
    _, eval_rows, _ = load_rows(cfg, "reward", "preference")
    with pytest.raises(DataError, match=r"held\.jsonl: all 3 held-out pairs are longer than data\.max_length=64"):
        heldout.select(eval_rows, _reward_encoder(tokenizer), cfg, "reward")


def test_eval_max_rows_defaults_to_2000_and_must_be_positive_or_null(tmp_path):
    assert config_from_dict({}).data.eval_max_rows == 2000
    assert config_from_dict({"data": {"eval_max_rows": None}}).data.eval_max_rows is None
    with pytest.raises(ConfigError, match="data.eval_max_rows: must be > 0 or null"):
        config_from_dict({"data": {"eval_max_rows": 0}})


def test_map_rows_shows_a_progress_bar_over_the_rows(capsys):
    assert heldout.map_rows(list(range(10)), lambda part: [x * 2 for x in part], 4, desc="reward: held-out check",
                            progress=True) == [x * 2 for x in range(10)]
    err = capsys.readouterr().err
    assert "reward: held-out check: 100%" in err and "10/10" in err


def test_encode_batch_gives_the_ids_of_encode_row_by_row(tokenizer):
    prompts = [[{"role": "user", "content": "Hi"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"},
                {"role": "assistant", "content": "Light."}, {"role": "user", "content": "More?"}],
               [{"role": "user", "content": "word " * 80}],  # the prompt alone is over the limit
               [{"role": "user", "content": "Short"}]]
    sides = [["Hello <|im_end|>", "Sunlight scatters.", "x", "a " * 70],  # the last reply is over the limit
             ["Hey", "Because of Rayleigh scattering.", "y", "b"]]
    batch = encoding.encode_batch(tokenizer, prompts, sides, MAX_LENGTH)
    for i, prompt in enumerate(prompts):
        one = [encoding.encode(tokenizer, prompt, side[i], MAX_LENGTH) for side in sides]
        assert batch[i] == (None if None in one else one), i
    assert [b is None for b in batch] == [False, False, True, True]
    # At the edge: a prompt of max_length - 1 tokens leaves room for a reply that is only EOS; one of
    # max_length tokens leaves none.
    by_length = {len(encoding.prompt_ids(tokenizer, p)): p
                 for p in ([{"role": "user", "content": "a" + " a" * k}] for k in range(30, 90))}
    edge = [by_length[MAX_LENGTH - 1], by_length[MAX_LENGTH]]
    eos_only = [["<|im_end|>", "<|im_end|>"]]  # tokenized as EOS alone
    fits = encoding.encode(tokenizer, edge[0], "<|im_end|>", MAX_LENGTH)
    assert len(fits[0]) == MAX_LENGTH and encoding.encode(tokenizer, edge[1], "<|im_end|>", MAX_LENGTH) is None
    assert encoding.encode_batch(tokenizer, edge, eos_only, MAX_LENGTH) == [[fits], None]
    unbounded = encoding.encode_batch(tokenizer, prompts, sides)  # no max_length: every row
    assert unbounded == [[encoding.encode(tokenizer, p, side[i]) for side in sides] for i, p in enumerate(prompts)]


def test_encoded_dataset_keeps_the_items_in_order_across_chunks(monkeypatch):
    monkeypatch.setattr(encoding, "CHUNK_ROWS", 3)
    items = [None if i % 4 == 0 else {"ids": [i] * (i % 3 + 1)} for i in range(11)]
    ds = encoding.encoded_dataset(iter(items), len(items), desc="x", progress=False)
    assert ds.to_list() == [item for item in items if item is not None]
    assert encoding.encoded_dataset(iter([None]), 1, desc="x", progress=False).num_rows == 0
