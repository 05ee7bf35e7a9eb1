"""The final stage with a critic-free advantage estimator (`ppo.advantage: grpo | dr_grpo | rloo |
reinforce_baseline`) on the tiny fixture: no critic is built, trained or saved; each prompt is answered
`samples_per_prompt` times and its group's advantages are the estimator's wherever the rows sit; a
stopped run resumes to the same weights as an uninterrupted one; the KL goes into the loss on request.
The estimators' maths is hand-checked in tests/unit/test_advantage_estimators.py."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_ppo import make_cfg, run_ppo

from rlhf.config import config_from_dict
from rlhf.errors import ConfigError, StopRequested
from rlhf.ppo_math import grpo_advantages, per_token_rewards
from rlhf.stages.ppo.experience import Forwards, Rollout, make_experience

pytestmark = pytest.mark.slow

GROUP = {"advantage": "grpo", "samples_per_prompt": 4, "rollout_batch_size": 2, "mini_batch_size": 4,
         "grad_accum": 2, "ppo_epochs": 1, "reward_fn": "ppo_reward:target_share"}


@pytest.fixture(autouse=True)
def _reward_module_on_path(monkeypatch):
    from test_ppo import HERE

    monkeypatch.syspath_prepend(str(HERE))


def test_a_critic_free_run_builds_no_critic_and_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    """Three models at most (here two: the reward is a program): no critic engine, no value loss, no
    critic/ in checkpoints or memory.json; 2 prompts x 4 samples = 8 rows a step. Stopped by SIGTERM after
    step 1 and resumed, the run ends bit-equal to one that was never stopped."""
    whole = make_cfg(tmp_path / "whole", tiny_model_dir, None, steps=3, **GROUP)
    critics, rows = [], []

    def watch(ctx, stats):
        critics.append(ctx.critic)
        rows.append(stats["perf/samples_per_s"] * stats["perf/step_time"])

    result, seen = run_ppo(whole, on_step=watch)
    assert critics == [None] * 3
    assert [round(r) for r in rows] == [8] * 3
    assert all(not any(k.startswith("value/") for k in s) for s in seen), seen[0].keys()
    ckpt = result.final_dir.parent / "checkpoints" / "checkpoint-3"
    assert (ckpt / "actor").is_dir() and not (ckpt / "critic").exists()
    memory = json.loads((result.final_dir.parent / "memory.json").read_text())
    assert set(memory["roles"]) == {"actor", "ref"}
    stage = json.loads((result.final_dir.parent / "stage.json").read_text())
    assert "critic" not in stage["devices"]

    stopped = make_cfg(tmp_path / "stopped", tiny_model_dir, None, steps=3, **GROUP)

    def stop_after_first(ctx, stats):
        if ctx.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the step finishes and its checkpoint is saved

    with pytest.raises(StopRequested):
        run_ppo(stopped, on_step=stop_after_first)
    resumed, seen = run_ppo(stopped)
    assert [s["step"] for s in seen] == [2, 3]
    a = load_file(str(result.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rollout_and_forwards(scores: list[float], group: list[int], kl_per_token: float):
    """Rows of 3 counted response tokens each, whose actor and reference log-probs differ by `kl_per_token`."""
    n, r = len(scores), 3
    mask = torch.ones(n, r)
    rollout = Rollout(rows=[{"prompt": "p"}] * n, prompt_ids=torch.ones(n, 2, dtype=torch.long),
                      prompt_mask=torch.ones(n, 2, dtype=torch.long), response_ids=torch.ones(n, r, dtype=torch.long),
                      mask=mask, has_eos=torch.ones(n, dtype=torch.bool), responses=["x"] * n,
                      group=torch.tensor(group))
    fwd = Forwards(logprobs=torch.full((n, r), -1.0), ref_logprobs=torch.full((n, r), -1.0 - kl_per_token),
                   values=torch.zeros(n, r), entropy=torch.zeros(n, r), raw_scores=torch.tensor(scores),
                   source_scores={"reward_model": torch.tensor(scores)})
    return rollout, fwd


def test_groups_are_estimated_wherever_their_rows_sit():
    """Two groups of 3 rows, interleaved (as the update's shuffle leaves them): each row's advantage is
    GRPO's within its own group, on every counted token; the KL term of kl_in: reward enters the return."""
    scores, group = [1.0, 10.0, 2.0, 20.0, 6.0, 60.0], [0, 1, 0, 1, 0, 1]
    ppo = make_cfg_ppo(advantage="grpo", samples_per_prompt=3, missing_eos_penalty=None, kl_in="reward")
    rollout, fwd = _rollout_and_forwards(scores, group, kl_per_token=0.5)
    exp = make_experience(rollout, fwd, ppo, kl_coef=0.1, reward_stats=None)
    # returns: score - 0.1 * (3 tokens x 0.5 KL) = score - 0.15 (a shift: GRPO's advantages do not move)
    by_group = grpo_advantages(torch.tensor([1.0, 2.0, 6.0, 10.0, 20.0, 60.0]) - 0.15, 3)
    expected = torch.tensor([by_group[0], by_group[3], by_group[1], by_group[4], by_group[2], by_group[5]])
    assert torch.allclose(exp.advantages, expected.unsqueeze(1).expand(6, 3), atol=1e-6)
    assert torch.allclose(exp.returns[:, 0], torch.tensor(scores) - 0.15, atol=1e-6)


def test_kl_in_loss_keeps_the_kl_out_of_the_rewards():
    scores, group = [1.0, 3.0, 2.0, 2.0], [0, 0, 1, 1]
    for kl_in, expected_shift in (("reward", -0.3), ("loss", 0.0)):
        ppo = make_cfg_ppo(advantage="rloo", samples_per_prompt=2, missing_eos_penalty=None, kl_in=kl_in)
        rollout, fwd = _rollout_and_forwards(scores, group, kl_per_token=1.0)
        exp = make_experience(rollout, fwd, ppo, kl_coef=0.1, reward_stats=None)
        assert torch.allclose(exp.rewards.sum(dim=1), torch.tensor(scores) + expected_shift, atol=1e-6), kl_in
        rewards, kl = per_token_rewards(torch.tensor(scores), fwd.logprobs, fwd.ref_logprobs, rollout.mask, 0.1, "k1")
        assert torch.equal(exp.kl, kl)  # the KL is measured (and controlled) either way
        # RLOO: r_i minus the other's score: +-2 in group 0, 0 in group 1 (the shift cancels)
        assert torch.allclose(exp.advantages[:, 0], torch.tensor([-2.0, 2.0, 0.0, 0.0]), atol=1e-6)


def test_a_kl_in_loss_run_reports_the_kl_term(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, None, steps=1, kl_in="loss", kl_coef=0.5,
                   loss_agg="seq_mean_token_mean", **{**GROUP, "advantage": "dr_grpo"})
    _, seen = run_ppo(cfg)
    stats = seen[0]
    assert stats["objective/kl"] == 0.0  # sampled by the SFT weights: actor == ref at the rollout
    # the second minibatch follows an update: a KL term > 0, averaged over the two into policy/kl_loss
    assert 0.0 < stats["policy/kl_loss"] < stats["policy/ref_kl"] and "value/loss" not in stats


def make_cfg_ppo(**ppo):
    return config_from_dict({"run": {"name": "t"}, "model": {"name_or_path": "tiny-random"}, "ppo": ppo}).ppo


@pytest.mark.parametrize("advantage", ["grpo", "dr_grpo", "rloo", "reinforce_baseline"])
def test_a_group_estimator_needs_a_group(advantage):
    with pytest.raises(ConfigError, match=r"ppo.samples_per_prompt: must be >= 2 for advantage: " + advantage):
        make_cfg_ppo(advantage=advantage)
    with pytest.raises(ConfigError, match=r"ppo.mini_batch_size: must divide the rollout's rows per rank \(12"):
        make_cfg_ppo(advantage=advantage, samples_per_prompt=3, rollout_batch_size=4, mini_batch_size=8)


def test_the_overlong_penalty_comes_off_the_score():
    """Rows of 3 counted tokens with max_new_tokens 4 and a buffer of 2: one token into the buffer, so half
    the penalty of 1.0 comes off each score (and the EOS penalty would too: none here)."""
    ppo = make_cfg_ppo(advantage="rloo", samples_per_prompt=2, missing_eos_penalty=None, max_new_tokens=4,
                       overlong_penalty=1.0, overlong_buffer=2)
    rollout, fwd = _rollout_and_forwards([1.0, 3.0, 2.0, 2.0], [0, 0, 1, 1], kl_per_token=0.0)
    exp = make_experience(rollout, fwd, ppo, kl_coef=0.0, reward_stats=None)
    assert torch.allclose(exp.scores, torch.tensor([0.5, 2.5, 1.5, 1.5]))
    with pytest.raises(ConfigError, match=r"ppo.overlong_buffer: must be in \[1, max_new_tokens \(4\)\]"):
        make_cfg_ppo(max_new_tokens=4, overlong_penalty=1.0, overlong_buffer=5)
