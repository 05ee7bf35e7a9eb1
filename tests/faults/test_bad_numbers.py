"""Bad numbers: a NaN/inf loss, gradient norm, reward or KL stops the run with exit 3 and a one-line message
naming the stage, the quantity and the step; no checkpoint holding the bad state is ever marked complete, and
the last good one stays loadable. PPO also stops when the KL passes `ppo.kl_ceiling`."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from faultkit import cfg_of, error_lines, extra_callback, fake_stage, tiny_raw, write_cfg
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from rlhf import artifacts, cli
from rlhf.errors import TrainingError
from rlhf.stages import run_stage

pytestmark = pytest.mark.slow

_CALLS = {"n": 0}


def nan_after_two_steps(prompts: list, responses: list) -> list[float]:
    """A PPO reward (`ppo.reward_fn: test_bad_numbers:nan_after_two_steps`) that breaks at its third call."""
    _CALLS["n"] += 1
    return [float("nan") if _CALLS["n"] > 2 else 0.5] * len(responses)


def _poisoned_copy(src, dst):
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_poisoned_weight_exits_3_before_any_checkpoint(tmp_path, rlhf_cache, tiny_model_dir, capsys):
    raw = tiny_raw(tmp_path, final_stage=None)
    raw["model"]["name_or_path"] = str(_poisoned_copy(tiny_model_dir, tmp_path / "poisoned"))
    config = write_cfg(tmp_path / "cfg.yaml", raw)
    assert cli.main(["sft", "--config", str(config)]) == 3
    lines = error_lines(capsys.readouterr().err)
    assert lines == ["error: sft: loss is nan at step 1; stopped before saving: no checkpoint was saved yet. "
                     "Lower sft.learning_rate or check the model weights and data, then re-run the same command"]
    assert artifacts.list_checkpoints(cfg_of(raw).stage_dir("sft") / "checkpoints") == []


class _PoisonAtStep(TrainerCallback):
    """Sets one weight to NaN at the start of step `step`: from then on loss, gradients and weights are NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.get_input_embeddings().weight[:, 0] = float("nan")


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_nan_mid_run_keeps_the_last_good_checkpoint(stage, tmp_path, rlhf_cache, tiny_model_dir):
    # Logged every 5 steps, saved every 2: step 3 goes bad, and the log forced before the step-4 save sees
    # it. Without that forced log (or with the Trainer's default NaN filter) checkpoint-4 would hold NaN
    # weights and be marked complete.
    raw = tiny_raw(tmp_path, final_stage=None)
    raw[stage].update({"logging_steps": 5})
    raw["reward"]["base_model"] = str(tiny_model_dir)
    cfg = cfg_of(raw)
    ckpts = cfg.stage_dir(stage) / "checkpoints"
    with extra_callback(_PoisonAtStep(3)), pytest.raises(TrainingError) as info:
        run_stage(stage, cfg)
    message = str(info.value)
    assert message.startswith(f"{stage}: loss is nan at step 4 (logged over steps 3-4); stopped before saving: "
                              f"the last good checkpoint {ckpts / 'checkpoint-2'} is kept")
    assert "\n" not in message and info.value.exit_code == 3
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-2"]
    assert not (ckpts / "checkpoint-4").exists()
    good = load_file(str(ckpts / "checkpoint-2" / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in good.values())


def test_huge_learning_rate_stops_with_exit_3(tmp_path, rlhf_cache, capsys):
    raw = tiny_raw(tmp_path, final_stage=None)
    raw["sft"].update({"learning_rate": 1e30})
    config = write_cfg(tmp_path / "cfg.yaml", raw)
    assert cli.main(["sft", "--config", str(config)]) == 3
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("error: sft: ") and " is nan at step 2; stopped before saving" in line


def _ppo_cfg(tmp_path, tiny_model_dir, **ppo):
    raw = tiny_raw(tmp_path, final_stage="ppo")
    raw["ppo"].update({"critic_init": "sft", "save_steps": 1,
                       "learning_rate": 1e-2, **ppo})
    cfg = cfg_of(raw)
    fake_stage(cfg.run.dir, "sft", tiny_model_dir)
    return cfg


def test_ppo_kl_ceiling_stops_and_keeps_the_last_checkpoint(tmp_path, rlhf_cache, tiny_model_dir):
    cfg = _ppo_cfg(tmp_path, tiny_model_dir, reward_fn="test_bad_numbers:nan_after_two_steps", kl_ceiling=1e-9)
    _CALLS["n"] = -100  # the reward stays finite here: only the KL ceiling can stop this run
    with pytest.raises(TrainingError) as info:
        run_stage("ppo", cfg)
    ckpts = cfg.stage_dir("ppo") / "checkpoints"
    # Step 1: the actor equals the reference (KL 0). Step 2 samples from the updated actor: KL > 1e-9.
    assert str(info.value).startswith("ppo: mean KL ")
    assert (f"exceeds ppo.kl_ceiling=1e-09 at step 2; the last good checkpoint in {ckpts} is kept"
            in str(info.value))
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-1"]


def test_ppo_nan_reward_mid_run_keeps_the_last_checkpoint(tmp_path, rlhf_cache, tiny_model_dir):
    cfg = _ppo_cfg(tmp_path, tiny_model_dir, reward_fn="test_bad_numbers:nan_after_two_steps")
    _CALLS["n"] = 0
    with pytest.raises(TrainingError, match=r"^ppo: reward score is not finite \(\[nan, .*\) at step 3; stopping"):
        run_stage("ppo", cfg)
    ckpts = cfg.stage_dir("ppo") / "checkpoints"
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-1", "checkpoint-2"]
    state = json.loads((ckpts / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    actor = load_file(str(ckpts / "checkpoint-2" / "actor" / "model.safetensors"))
    assert all(math.isfinite(float(t.abs().max())) for t in actor.values())
