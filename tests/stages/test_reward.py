"""Reward stage on the tiny fixture: reward-model-only training reaches high held-out accuracy, stores
reward stats, saves a standard sequence-classification checkpoint, and `rlhf score` uses it."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, cli_env, run_cli, tiny_cfg

from rlhf import artifacts, models
from rlhf.errors import RlhfError
from rlhf.stages import run_stage

pytestmark = pytest.mark.slow


def _reward_only(tmp_path, extra=()):
    return tiny_cfg(tmp_path, ["reward.max_steps=30", *extra], drop=("sft", "final_stage", "ppo", "dpo", "orpo"))


def test_reward_only_training_separable_pairs(tmp_path, rlhf_cache):
    cfg = _reward_only(tmp_path)
    assert cfg.stages == ["reward"]
    final = run_stage("reward", cfg).final_dir
    assert not cfg.stage_dir("sft").exists()  # no SFT stage involved
    manifest = artifacts.read_manifest(cfg.stage_dir("reward"))
    assert manifest["model_kind"] == "reward_model"
    # Done-when: held-out preference accuracy above 0.9 on the separable synthetic set.
    assert manifest["metrics"]["preference_accuracy"] > 0.9
    assert manifest["metrics"]["eval_pairs"] >= 20
    assert manifest["metrics"]["saved_vs_live_max_abs_diff"] < 1e-4
    stats = models.load_reward_stats(final)
    assert stats["std"] > 0 and stats["n"] == 2 * manifest["metrics"]["eval_pairs"]
    # A standard checkpoint: plain transformers loads it with its trained head.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(final))
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None

    # `rlhf score` writes one reward per row, and chosen outscores rejected on this set.
    out = tmp_path / "scores.jsonl"
    proc = run_cli(["score", "--model", str(final), "--data", str(ROOT / "data/tiny/preference.jsonl"),
                    "--out", str(out)], env=cli_env(rlhf_cache))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 128
    assert sum(r["chosen_reward"] > r["rejected_reward"] for r in rows) / len(rows) > 0.9


def test_reward_after_sft_needs_the_sft_output(tmp_path, rlhf_cache):
    cfg = tiny_cfg(tmp_path)  # has an sft section, so the reward base is the SFT output
    with pytest.raises(RlhfError, match=r"the sft stage has not finished .* run `rlhf sft --config"):
        run_stage("reward", cfg)


def test_ppo_refuses_a_causal_lm_as_reward_model(tmp_path, rlhf_cache):
    import shutil

    cfg = tiny_cfg(tmp_path)
    policy = models.resolve_model("tiny-random")
    for stage in ("sft", "reward"):  # the reward "output" is a causal LM: wrong kind
        shutil.copytree(policy, cfg.stage_dir(stage) / "final")
        artifacts.write_manifest(cfg.stage_dir(stage), stage, inputs={}, config_hash="x", metrics={})
    with pytest.raises(RlhfError, match="not a reward model"):
        run_stage("ppo", cfg)
