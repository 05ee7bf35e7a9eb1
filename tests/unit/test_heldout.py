"""Held-out checks split over ranks (`rlhf.heldout`): each rank takes whole batches, the merge restores row
order, and scoring the shards gives the one-process numbers bit for bit (same batches, same padding)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf import data, heldout, models
from rlhf.forwards import pair_logps

ROOT = Path(__file__).resolve().parents[2]


def test_shard_of_26_rows_over_2_ranks_in_batches_of_8():
    # 26 rows = 4 batches (8, 8, 8, 2): rank 0 gets batches 0-1, rank 1 batches 2-3
    assert heldout.shard(26, 0, 2, 8) == range(0, 16)
    assert heldout.shard(26, 1, 2, 8) == range(16, 26)
    # 1 batch, 4 ranks: one rank scores it, the others get nothing
    assert [len(heldout.shard(3, r, 4, 8)) for r in range(4)] == [0, 0, 0, 3]


@pytest.mark.parametrize(("n_rows", "world", "batch"), [(26, 2, 8), (26, 3, 8), (5, 4, 2), (3, 4, 8), (0, 2, 8),
                                                        (16, 2, 8), (17, 5, 1)])
def test_shards_are_whole_batches_and_merge_back_in_row_order(n_rows, world, batch):
    rows = [f"row{i}" for i in range(n_rows)]
    shards = [heldout.shard(n_rows, rank, world, batch) for rank in range(world)]
    assert heldout.merge([rows[s.start:s.stop] for s in shards]) == rows
    assert all(s.start % batch == 0 for s in shards if len(s))  # every shard starts on a batch boundary
    n_batches = [-(-len(s) // batch) for s in shards]
    assert max(n_batches) - min(n_batches) <= 1


def test_map_rows_in_one_process_is_fn_on_all_rows():
    assert heldout.map_rows([3, 1, 2], lambda part: [x * 10 for x in part], batch_size=2) == [30, 10, 20]


def test_scoring_the_shards_equals_scoring_all_rows(tiny_model_dir):
    rows = data.load(str(ROOT / "data/tiny/preference.jsonl"), "preference").rows[:13]
    tok = models.load_tokenizer(str(tiny_model_dir))
    model = models.load_causal_lm(str(tiny_model_dir), tokenizer=tok).eval()
    whole = pair_logps(model, tok, rows, mean=True, batch_size=4)
    parts = [pair_logps(model, tok, rows[s.start:s.stop], mean=True, batch_size=4)
             for s in (heldout.shard(len(rows), rank, 3, 4) for rank in range(3))]
    assert [len(p) for p in parts] == [4, 4, 5]  # 4 batches (4, 4, 4, 1) over 3 ranks: 1, 1, 2
    assert heldout.merge(parts) == whole  # exact: each row in the same batch as in one process
