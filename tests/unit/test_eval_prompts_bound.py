"""`rlhf eval` evaluates at most `data.eval_max_rows` held-out prompts, a sample seeded by `run.seed` kept in
file order, or the first N with `--prompts N`; one log line says which (`evaluation.eval_prompts`)."""

from __future__ import annotations

import json
import logging

from rlhf.commands.evaluation import eval_prompts
from rlhf.config import config_from_dict


def _config(tmp_path, n_prompts: int, **data):
    path = tmp_path / "prompts_eval.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(n_prompts)))
    raw = {"run": {"output_dir": str(tmp_path / "runs"), "seed": data.pop("seed", 0)},
           "model": {"name_or_path": "tiny-random"},
           "data": {"prompts": str(path), "prompts_eval": str(path), **data}}
    return config_from_dict(raw, source="c.yaml"), path


def _numbers(prompts) -> list[int]:
    return [int(p[0]["content"].split()[1]) for p in prompts]


def test_a_large_prompt_file_is_bounded_by_a_seeded_sample_in_file_order(tmp_path, caplog):
    cfg, path = _config(tmp_path, 500, eval_max_rows=40)
    with caplog.at_level(logging.INFO, logger="rlhf"):
        prompts, available = eval_prompts(cfg, None)
    picked = _numbers(prompts)
    assert (len(picked), available) == (40, 500)
    assert picked == sorted(set(picked)) and picked != list(range(40))  # file order, not the first 40
    assert (f"eval: 40 of 500 held-out prompts of {path}: a sample seeded by run.seed (data.eval_max_rows=40; "
            "--prompts N takes the first N instead)") in caplog.messages
    assert _numbers(eval_prompts(cfg, None)[0]) == picked  # repeatable
    other, _ = _config(tmp_path, 500, eval_max_rows=40, seed=1)
    assert _numbers(eval_prompts(other, None)[0]) != picked


def test_the_default_bound_is_2000(tmp_path):
    cfg, _ = _config(tmp_path, 2500)
    assert cfg.data.eval_max_rows == 2000
    assert len(eval_prompts(cfg, None)[0]) == 2000


def test_prompts_within_the_bound_are_all_taken_in_order(tmp_path, caplog):
    cfg, path = _config(tmp_path, 30, eval_max_rows=40)
    with caplog.at_level(logging.INFO, logger="rlhf"):
        prompts, available = eval_prompts(cfg, None)
    assert (_numbers(prompts), available) == (list(range(30)), 30)
    assert f"eval: 30 of 30 held-out prompts of {path}: all of them (data.eval_max_rows=40)" in caplog.messages


def test_null_takes_every_prompt_and_the_flag_takes_the_first_n(tmp_path, caplog):
    cfg, path = _config(tmp_path, 300, eval_max_rows=None)
    assert _numbers(eval_prompts(cfg, None)[0]) == list(range(300))
    bounded, _ = _config(tmp_path, 300, eval_max_rows=40)
    with caplog.at_level(logging.INFO, logger="rlhf"):
        prompts, available = eval_prompts(bounded, 100)  # --prompts 100, above the bound: what was asked
    assert (_numbers(prompts), available) == (list(range(100)), 300)
    assert f"eval: 100 of 300 held-out prompts of {path}: the first ones (--prompts 100)" in caplog.messages
