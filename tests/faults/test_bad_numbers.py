"""Bad numbers: a NaN/inf loss, gradient norm, reward or KL stops the run with exit 3 and a one-line message
naming the stage, the quantity and the step; no checkpoint holding the bad state is ever marked complete, and
the last good one stays loadable. PPO also stops when the KL passes `ppo.kl_ceiling`."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from faultkit import PPO_STEPS, STEPS, cfg_of, error_lines, extra_callback, fake_stage, tiny_raw, write_cfg
from faulty_cli import nan_grads_callback
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from rlhf import artifacts, cli
from rlhf.errors import TrainingError
from rlhf.stages import run_stage
from rlhf.tracking import read_metrics

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
                     "Lower sft.learning_rate or check the model weights and data, then re-run the same command (add "
                     "--restart after changing a setting the weights depend on: resuming under it is refused)"]
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
    with pytest.raises(TrainingError, match=r"^ppo: the reward score of test_bad_numbers:nan_after_two_steps for "
                       r"prompt row .* is nan at step 3; stopped before saving: the last "
                       r"good checkpoint .*checkpoint-2 is kept\. Lower ppo\.learning_rate"):
        run_stage("ppo", cfg)
    ckpts = cfg.stage_dir("ppo") / "checkpoints"
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-1", "checkpoint-2"]
    state = json.loads((ckpts / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    actor = load_file(str(ckpts / "checkpoint-2" / "actor" / "model.safetensors"))
    assert all(math.isfinite(float(t.abs().max())) for t in actor.values())


# ----------------------------------------------------------------------------- run.on_nonfinite: skip


def _skip_raw(tmp_path, **run):
    raw = tiny_raw(tmp_path, final_stage=None)
    raw["run"].update({"on_nonfinite": "skip", **run})
    raw["sft"].update({"save_steps": 1, "save_total_limit": 20})
    return raw


def test_skip_drops_only_the_bad_update_and_the_run_finishes(tmp_path, rlhf_cache, tiny_model_dir):
    cfg = cfg_of(_skip_raw(tmp_path))
    with extra_callback(nan_grads_callback(3, 3)):
        run_stage("sft", cfg)
    assert _global_step(cfg, "sft") == STEPS["max_steps"]
    ckpts = cfg.stage_dir("sft") / "checkpoints"
    weights = {n: load_file(str(ckpts / f"checkpoint-{n}" / "model.safetensors")) for n in (1, 2, 3, 4)}
    # Step 3 applied nothing at all (no moment update, no weight decay); steps 2 and 4 did train.
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert any(not torch.equal(weights[3][k], weights[4][k]) for k in weights[3])
    rows = {r["step"]: r for r in read_metrics(cfg.stage_dir("sft") / "metrics.jsonl") if "skipped_steps" in r}
    assert rows[2]["skipped_steps"] == 0 and rows[3]["skipped_steps"] == 1 and rows[8]["skipped_steps"] == 1
    assert "grad_norm" not in rows[3] and math.isfinite(rows[4]["grad_norm"])


def test_skip_stops_after_max_consecutive_skips(tmp_path, rlhf_cache, tiny_model_dir):
    cfg = cfg_of(_skip_raw(tmp_path, max_consecutive_skips=3))
    with extra_callback(nan_grads_callback(3, 100)), pytest.raises(TrainingError) as info:
        run_stage("sft", cfg)
    ckpts = cfg.stage_dir("sft") / "checkpoints"
    assert str(info.value).startswith("sft: the gradient is nan at step 5 (3 steps in a row; "
                                      "run.max_consecutive_skips=3); stopped before saving: the last good "
                                      f"checkpoint {ckpts / 'checkpoint-4'} is kept")
    assert artifacts.latest_checkpoint(ckpts).name == "checkpoint-4"


def nan_on_third_call(prompts: list, responses: list) -> list[float]:
    """A PPO reward that is NaN at its third call only."""
    _CALLS["n"] += 1
    return [float("nan") if _CALLS["n"] == 3 else 0.5] * len(responses)


def test_ppo_skip_drops_a_nan_rollout_and_finishes(tmp_path, rlhf_cache, tiny_model_dir):
    cfg = _ppo_cfg(tmp_path, tiny_model_dir, reward_fn="test_bad_numbers:nan_on_third_call")
    cfg.run.on_nonfinite = "skip"
    _CALLS["n"] = 0
    run_stage("ppo", cfg)
    assert _global_step(cfg, "ppo") == PPO_STEPS["steps"]
    rows = {r["step"]: r for r in read_metrics(cfg.stage_dir("ppo") / "metrics.jsonl")}
    assert rows[3]["guard/skipped_rollouts"] == 1 and "policy/loss" not in rows[3]
    assert rows[2]["guard/skipped_steps"] == 0 and rows[6]["guard/skipped_steps"] == 1
    assert math.isfinite(rows[4]["policy/loss"])


def test_ppo_skip_drops_a_nan_actor_update_but_not_the_critic_update(tmp_path, rlhf_cache, tiny_model_dir):
    cfg = _ppo_cfg(tmp_path, tiny_model_dir, reward_fn="test_bad_numbers:nan_on_third_call")
    cfg.run.on_nonfinite = "skip"
    _CALLS["n"] = -100  # a finite reward throughout
    handles, snapshots = [], {}

    def poison_step_2(ctx, stats):  # runs after each step: the hook makes every actor gradient of step 2 NaN
        snapshots[ctx.step] = {role: {n: p.detach().clone() for n, p in eng.module.named_parameters()
                                      if p.requires_grad} for role, eng in (("actor", ctx.actor), ("critic", ctx.critic))}
        if ctx.step == 1:
            weight = next(p for p in ctx.actor.module.parameters() if p.requires_grad)
            handles.append(weight.register_hook(lambda grad: torch.full_like(grad, float("nan"))))
        elif ctx.step == 2:
            handles.pop().remove()

    from rlhf.stages import ppo

    ppo.run(cfg, on_step=poison_step_2)
    assert _global_step(cfg, "ppo") == PPO_STEPS["steps"]
    rows = {r["step"]: r for r in read_metrics(cfg.stage_dir("ppo") / "metrics.jsonl")}
    assert rows[2]["guard/skipped_updates"] == 1 and rows[3]["guard/skipped_updates"] == 0
    assert rows[4]["guard/skipped_steps"] == 1

    def same(a, b, role):
        return all(torch.equal(snapshots[a][role][k], snapshots[b][role][k]) for k in snapshots[a][role])

    assert same(1, 2, "actor") and not same(2, 3, "actor")  # step 2 left the actor exactly as it was
    assert not same(1, 2, "critic")  # the critic's finite update of step 2 was applied
    assert all(bool(torch.isfinite(t).all()) for t in snapshots[6]["actor"].values())


def _global_step(cfg, stage: str) -> int:
    return json.loads((cfg.stage_dir(stage) / artifacts.MANIFEST).read_text())["global_step"]
