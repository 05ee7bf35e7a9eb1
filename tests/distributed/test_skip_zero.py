"""`run.on_nonfinite: skip` under `deepspeed --num_gpus 2` with ZeRO: one optimizer step (Trainer stage) or
actor update (PPO, ZeRO 2 and 3) whose gradients are NaN (injected by tests/faults/faulty_cli.py) applies no update on any
rank, is counted, and the run finishes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhf import artifacts
from rlhf.tracking import read_metrics

sys.path.insert(0, str(Path(__file__).parent))
from launch import deepspeed_cli, ppo_config  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


# ZeRO-3 only: the Trainer's skip is the same callback at every stage; stage 3, with parameters partitioned
# too, is the one whose engine step differs most (stages 1 and 2 share DeepSpeed's ZeRO optimizer class).
@pytest.mark.parametrize("zero_stage", [3])
def test_skip_discards_a_nan_step_under_zero(tmp_path, rlhf_cache, zero_stage):
    raw = yaml.safe_load((ROOT / "configs" / "reward_only.yaml").read_text())
    raw["run"].update({"output_dir": str(tmp_path / "runs"), "on_nonfinite": "skip"})
    raw["data"]["preference"] = str(ROOT / raw["data"]["preference"])
    raw["reward"].update({"max_steps": 5, "save_steps": 1, "save_total_limit": 10, "logging_steps": 1})
    raw["deepspeed"] = {"enabled": True, "zero_stage": zero_stage}
    raw["logging"] = {"progress": False, "tensorboard": False, "plots": False}
    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = deepspeed_cli(["reward", "--config", str(config)], script=ROOT / "tests" / "faults" / "faulty_cli.py",
                         env={"RLHF_FAULT": "nan_grads_in_step:3"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stage_dir = tmp_path / "runs" / raw["run"]["name"] / "reward"
    assert artifacts.read_manifest(stage_dir)["global_step"] == 5
    ckpts = stage_dir / "checkpoints"
    weights = {n: load_file(str(ckpts / f"checkpoint-{n}" / "model.safetensors")) for n in (2, 3, 4)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])  # step 3 applied nothing
    assert any(not torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # step 4 trained
    rows = {r["step"]: r for r in read_metrics(stage_dir / "metrics.jsonl") if "skipped_steps" in r}
    assert rows[2]["skipped_steps"] == 0 and rows[3]["skipped_steps"] == 1 and rows[5]["skipped_steps"] == 1


# Stage 1 left out: it shares DeepSpeed's ZeRO optimizer class with stage 2 (gradients partitioned there too).
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_ppo_skip_discards_a_nan_actor_update_under_zero(tmp_path, tiny_model_dir, tiny_reward_dir, zero_stage):
    config = ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, zero_stage=zero_stage, run={"on_nonfinite": "skip"},
                        ppo={"steps": 3, "mini_batch_size": 4, "grad_accum": 1, "learning_rate": 1e-3,
                             "critic_learning_rate": 1e-3, "save_steps": 10, "sample_every": 10})
    run_dir = tmp_path / "runs" / "t"
    report = tmp_path / "report"
    proc = deepspeed_cli(["ppo", "--config", str(config)], script=ROOT / "tests" / "faults" / "faulty_cli.py",
                         env={"RLHF_FAULT": "nan_actor_grads_in_ppo_step:2", "RLHF_FAULT_REPORT": str(report)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stage_dir = run_dir / "ppo"
    assert artifacts.read_manifest(stage_dir)["global_step"] == 3
    # on every rank the poisoned update left the actor as it was (under ZeRO-3: the rank's partition of it);
    # the critic's applied
    for rank in (0, 1):
        assert json.loads((tmp_path / f"report-{rank}.json").read_text()) == {"actor_unchanged": True,
                                                                              "critic_unchanged": False}
    rows = {r["step"]: r for r in read_metrics(stage_dir / "metrics.jsonl")}
    assert rows[1]["guard/skipped_updates"] == 0 and rows[2]["guard/skipped_updates"] == 1
    assert rows[3]["guard/skipped_updates"] == 0 and rows[3]["guard/skipped_steps"] == 1
