"""`rlhf plan` against a measured LoRA PPO run: one step of the tiny fixture in this process (plain-torch
engines) with a LoRA actor and a LoRA critic, the critic and the frozen reward model on a wider and
deeper architecture than the policy. The model-state elements each role holds (parameters plus Adam m
and v, from <run>/ppo/memory.json) must equal the plan's, role by role; likewise for a critic-free run
(grpo, a program for the reward: actor and reference alone). The full fine-tuning counterpart, under
ZeRO-3 on two launched ranks, is in tests/distributed/test_two_nodes.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_ppo import make_cfg, run_ppo

from rlhf import plan


def _wide_reward(out: Path, policy: Path) -> Path:
    """A random 1-label reward model on the policy's tokenizer (so it can initialise the critic) with its
    own architecture: hidden 96 and 3 layers where the policy has 64 and 2."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    conf = AutoConfig.from_pretrained(policy)
    conf.hidden_size, conf.intermediate_size, conf.num_hidden_layers, conf.num_labels = 96, 192, 3, 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        LlamaForSequenceClassification(conf).save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return out


def test_lora_ppo_model_state_per_role_equals_the_plan(tmp_path, tiny_model_dir):
    reward_dir = _wide_reward(tmp_path / "wide_reward", tiny_model_dir)
    cfg = make_cfg(tmp_path, tiny_model_dir, reward_dir, steps=1, ppo_epochs=1, grad_accum=1,
                   rollout_batch_size=4, max_new_tokens=4)
    cfg.logging.plots = False
    cfg.model.lora.enabled, cfg.model.lora.r = True, 4
    cfg.model.lora.target_modules = ["q_proj", "v_proj", "down_proj"]
    run_ppo(cfg)
    measured = json.loads((cfg.stage_dir("ppo") / "memory.json").read_text())["roles"]

    est = plan.estimate(cfg, gpus=1, nodes=1)
    planned = {m.role: {"params": m.local_param_numel, "optimizer_state": m.local_optim_numel} for m in est.models}
    print(f"per-role model-state elements: plan {planned}, measured {measured}")
    assert set(planned) == set(measured) == {"actor", "critic", "reward"}  # a LoRA actor is its own reference
    for role, counts in measured.items():
        assert planned[role] == {"params": counts["params"], "optimizer_state": counts["optimizer_state"]}, role
    # the critic and reward rows are the wide model's, not the policy's; the critic trains its head too
    actor, critic, reward = est.models
    assert critic.arch_source == reward.arch_source == str(cfg.stage_dir("reward") / "final" / "config.json")
    assert critic.params > reward.params > actor.params  # wide classifier + adapters + head copy > tiny LM
    assert 0 < actor.trained_params < critic.trained_params < 0.2 * critic.params


def test_critic_free_ppo_model_state_per_role_equals_the_plan(tmp_path, tiny_model_dir):
    # grpo over 2 samples per prompt with a program for the reward: memory.json holds the actor and the
    # reference only, and so does the plan, with the same elements
    cfg = make_cfg(tmp_path, tiny_model_dir, None, steps=1, ppo_epochs=1, grad_accum=1, rollout_batch_size=2,
                   mini_batch_size=4, max_new_tokens=4, advantage="grpo", samples_per_prompt=2,
                   reward_fn="ppo_reward:target_share")
    cfg.logging.plots = False
    run_ppo(cfg)
    measured = json.loads((cfg.stage_dir("ppo") / "memory.json").read_text())["roles"]
    est = plan.estimate(cfg, gpus=1, nodes=1)
    planned = {m.role: {"params": m.local_param_numel, "optimizer_state": m.local_optim_numel} for m in est.models}
    assert set(planned) == set(measured) == {"actor", "ref"}
    for role, counts in measured.items():
        assert planned[role] == {"params": counts["params"], "optimizer_state": counts["optimizer_state"]}, role
