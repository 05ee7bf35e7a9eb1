"""Reward stage under `deepspeed --num_gpus 2` on CPU with ZeRO-3: trains, saves, and the saved model,
loaded in a single process, scores exactly as the sharded model did before saving. The held-out check,
split over the two ranks, reports what one process computes on all rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhf import artifacts, metrics, models, scoring
from rlhf.config import load_config
from rlhf.data import load_rows

sys.path.insert(0, str(Path(__file__).parent))
from launch import deepspeed_cli  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_reward_zero3_two_ranks_saves_a_model_that_scores_the_same(tmp_path, rlhf_cache):
    raw = yaml.safe_load((ROOT / "configs" / "reward_only.yaml").read_text())
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    raw["data"]["preference"] = str(ROOT / raw["data"]["preference"])
    raw["reward"].update({"max_steps": 6, "save_steps": 3})
    raw["deepspeed"] = {"enabled": True, "zero_stage": 3}
    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = deepspeed_cli(["reward", "--config", str(config)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stage_dir = tmp_path / "runs" / raw["run"]["name"] / "reward"
    manifest = artifacts.read_manifest(stage_dir)
    assert manifest["global_step"] == 6
    # Scores of the sharded (ZeRO-3) model before saving == scores of the saved model in one process.
    assert manifest["metrics"]["saved_vs_live_max_abs_diff"] < 1e-5
    # The checkpoints are DeepSpeed ones (sharded optimizer state), complete and resumable.
    ckpt = artifacts.latest_checkpoint(stage_dir / "checkpoints")
    assert ckpt is not None and (ckpt / "global_step6").is_dir()
    # The saved model is a plain HF reward model with full (gathered) weights.
    final = stage_dir / "final"
    tok = models.load_tokenizer(str(final))
    model = models.load_scalar_model(str(final), tokenizer=tok, require_head=True).eval()
    assert all(p.numel() > 0 for p in model.parameters())
    # Held-out check: rank 0 scored pairs 0-15, rank 1 pairs 16-25 (whole batches of eval_batch_size 8);
    # the gathered report equals one process scoring all 26 pairs.
    cfg = load_config(config)
    _, eval_rows, _ = load_rows(cfg, "reward", "preference")
    assert len(eval_rows) == 26
    expected = metrics.preference_report(*scoring.score_preferences(model, tok, eval_rows, batch_size=8))
    for key, value in expected.items():
        assert manifest["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    assert json.loads((final / "reward_stats.json").read_text())["n"] == 52
    rows = [json.loads(line) for line in (ROOT / "data/tiny/preference.jsonl").read_text().splitlines()[:4]]
    prompts = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    a = scoring.score(model, tok, prompts, [r["chosen"] for r in rows])
    b = scoring.score(model, tok, prompts, [r["chosen"] for r in rows], batch_size=1)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
