"""PPO stage on the tiny fixture: exact first ratio, masking, EOS scoring, learning, resume, LoRA, guards.

Each run builds a fake "previous stages" dir (the fixture models copied into sft/final and reward/final
with their manifests), then calls `rlhf.stages.ppo.run` in this process (plain-torch engines).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

from rlhf import artifacts
from rlhf.config import config_from_dict
from rlhf.errors import ModelError, StopRequested, TrainingError

HERE = Path(__file__).parent
QUESTIONS = ["What is the capital of France?", "How do plants grow?", "Why is the sky blue?", "Tell me a joke.",
             "Where do penguins live?", "How many legs does a spider have?", "Which planet is largest?"]


@pytest.fixture(autouse=True)
def _reward_module_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # ppo.reward_fn: ppo_reward:<fn>


def make_cfg(tmp_path: Path, policy: Path, reward: Path | None, **ppo) -> object:
    """A pipeline config whose sft (and reward) stages are already complete under tmp_path/runs/t (no sft
    stage with `policy_init="base"`: `policy` is then the base model)."""
    run_dir = tmp_path / "runs" / "t"
    for stage, src in (("sft", None if ppo.get("policy_init") == "base" else policy), ("reward", reward)):
        if src is not None and not (run_dir / stage / artifacts.MANIFEST).exists():
            shutil.copytree(src, run_dir / stage / "final")
            artifacts.write_manifest(run_dir / stage, stage, inputs={}, config_hash="test", metrics={})
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{q} ({i})"}]}) + "\n"
                                   for i, q in enumerate(QUESTIONS * 4)), encoding="utf-8")
    settings = {"steps": 2, "rollout_batch_size": 8, "mini_batch_size": 4, "grad_accum": 2, "ppo_epochs": 2,
                "learning_rate": 1e-3, "critic_learning_rate": 1e-3, "max_new_tokens": 10, "save_steps": 1,
                "sample_every": 1, **ppo}
    return config_from_dict({
        "run": {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
        "model": {"name_or_path": str(policy)},
        "data": {"prompts": str(prompts), "eval_fraction": 0.0, "max_length": 128, "max_prompt_length": 32},
        "final_stage": "ppo", "ppo": settings, "deepspeed": {"enabled": False},
        "logging": {"progress": False, "tensorboard": False},
    }, source="test")


def run_ppo(cfg, on_step=None, restart: bool = False):
    from rlhf.stages import ppo

    seen: list[dict] = []

    def hook(ctx, stats):
        seen.append(dict(stats, step=ctx.step))
        if on_step is not None:
            on_step(ctx, stats)

    result = ppo.run(cfg, restart=restart, on_step=hook)
    return result, seen


def test_two_steps_exact_first_ratio_stable_and_saved(tmp_path, tiny_model_dir, tiny_reward_dir):
    # ppo_epochs=2 x 2 minibatches x 2 micro-batches per step, against the tiny random reward model
    cfg = make_cfg(tmp_path, tiny_model_dir, tiny_reward_dir)
    result, seen = run_ppo(cfg)
    assert [s["step"] for s in seen] == [1, 2]
    for stats in seen:
        assert abs(stats["policy/ratio_first"] - 1.0) < 1e-6
        assert stats["policy/log_ratio_first_absmax"] < 1e-6  # every token, not just the mean
        for key in ("policy/loss", "value/loss", "objective/kl", "policy/approx_kl", "objective/entropy"):
            assert math.isfinite(stats[key]), key
        assert stats["policy/approx_kl"] < 0.1  # two epochs over two minibatches stay close to the rollout policy
    assert seen[0]["objective/kl"] == 0.0  # actor == ref before the first update
    final = result.final_dir
    assert (final / "model.safetensors").is_file() and (final / "config.resolved.yaml").is_file()
    assert (final / "tokenizer.json").is_file()
    manifest = json.loads((final.parent / "stage.json").read_text())
    assert manifest["global_step"] == 2
    from safetensors.torch import load_file

    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every actor tensor trained
    assert (final.parent / "curves.png").is_file() and (final.parent / "samples.jsonl").is_file()
    memory = json.loads((final.parent / "memory.json").read_text())
    assert memory["roles"]["actor"]["optimizer_state"] == 2 * memory["roles"]["actor"]["params"]


def _models(policy_dir, reward_dir=None):
    from rlhf import engine, models
    from rlhf.config import DeepSpeedCfg
    from rlhf.stages.ppo import disable_dropout

    tok = models.load_tokenizer(str(policy_dir), padding_side="left")
    ds = DeepSpeedCfg(enabled=False)
    actor = models.load_causal_lm(str(policy_dir), tokenizer=tok)
    disable_dropout(actor)
    out = {"tok": tok, "actor": engine.wrap(actor, ds, "actor")}
    if reward_dir is not None:
        out["reward"] = models.load_scalar_model(str(reward_dir), tokenizer=tok, require_head=True).eval()
    return out


def _rollout(tok, prompts, responses: list[list[int]]):
    """A hand-made Rollout: the given response ids, right-padded; mask from the real EOS rule."""
    from rlhf.batching import encode_prompts
    from rlhf.ppo_math import response_mask
    from rlhf.stages.ppo.experience import Rollout

    p_ids, p_mask = encode_prompts(tok, prompts, 32)
    width = max(len(r) for r in responses)
    r_ids = torch.full((len(responses), width), tok.pad_token_id)
    for i, r in enumerate(responses):
        r_ids[i, :len(r)] = torch.tensor(r)
    mask, has_eos = response_mask(r_ids, tok.eos_token_id, tok.pad_token_id)
    return Rollout(rows=[{"prompt": p} for p in prompts], prompt_ids=p_ids, prompt_mask=p_mask, response_ids=r_ids, mask=mask,
                   has_eos=has_eos, responses=["x"] * len(responses), group=torch.arange(len(responses)))


def test_post_eos_tokens_carry_no_loss(tiny_model_dir):
    from rlhf import engine
    from rlhf.config import PPOCfg
    from rlhf.losses import logprobs_from_logits
    from rlhf.ppo_math import ppo_policy_loss
    from rlhf.programs import Program
    from rlhf.stages.ppo.experience import Scorer, forward_all, make_experience, policy_logits

    m = _models(tiny_model_dir)
    tok, actor = m["tok"], m["actor"]
    eos = tok.eos_token_id
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]
    # row 0 ends at EOS (index 2) and is followed by junk that is NOT padding; row 1 has no EOS
    junk_a = _rollout(tok, prompts, [[10, 11, eos, 50, 60, 70], [20, 21, 22, 23, 24, 25]])
    junk_b = _rollout(tok, prompts, [[10, 11, eos, 80, 90, 99], [20, 21, 22, 23, 24, 25]])
    assert junk_a.mask[0].tolist() == [1, 1, 1, 0, 0, 0] and junk_a.mask[1].sum() == 6
    critic = engine.wrap(_models_critic(tiny_model_dir, tok), _no_ds(), "critic")
    ppo = PPOCfg(missing_eos_penalty=1.0, kl_coef=0.1, reward_fn="test:ones")
    scorer = Scorer(programs=[Program("test:ones", lambda p, r: [1.0] * len(r))])
    exps, grads = [], []
    for rollout in (junk_a, junk_b):
        fwd = forward_all(rollout, actor, actor, critic, scorer, micro_batch=2, temperature=1.0,
                          sources=ppo.reward_sources)
        exp = make_experience(rollout, fwd, ppo, kl_coef=0.1, reward_stats=None)
        logits = policy_logits(actor, exp.input_ids, exp.attention_mask, exp.position_ids, exp.prompt_len, 1.0)
        logprobs = logprobs_from_logits(logits, exp.response_ids).detach().requires_grad_(True)
        loss, _ = ppo_policy_loss(logprobs, exp.logprobs, exp.advantages, exp.mask, 0.2)
        loss.backward()
        exps.append((exp, loss.item()))
        grads.append(logprobs.grad)
    (a, loss_a), (b, loss_b) = exps
    for name in ("advantages", "returns", "rewards", "kl"):
        assert getattr(a, name)[0, 3:].abs().sum() == 0, name  # nothing after EOS
        torch.testing.assert_close(getattr(a, name), getattr(b, name))  # junk after EOS changes nothing
    assert loss_a == loss_b
    assert grads[0][0, 3:].abs().sum() == 0 and grads[0][0, :3].abs().sum() > 0
    assert a.scores[1] == a.raw_scores[1] - 1.0 and a.scores[0] == a.raw_scores[0]  # missing-EOS penalty


def _no_ds():
    from rlhf.config import DeepSpeedCfg

    return DeepSpeedCfg(enabled=False)


def _models_critic(path, tok):
    from rlhf import models
    from rlhf.forwards import ScalarHead

    return ScalarHead(models.load_scalar_model(str(path), tokenizer=tok, require_head=False))


def test_score_read_at_eos_not_padding(tiny_model_dir, tiny_reward_dir):
    from rlhf.batching import position_ids
    from rlhf.forwards import ScalarHead
    from rlhf.stages.ppo.experience import score_at_eos

    m = _models(tiny_model_dir, tiny_reward_dir)
    tok, rm = m["tok"], m["reward"]
    eos = tok.eos_token_id
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": QUESTIONS[5]}]]
    rollout = _rollout(tok, prompts, [[30, 31, eos], [40, 41, 42, 43, 44, eos]])  # row 0: left pad + right pad
    ids, attn = rollout.input_ids, rollout.attention_mask
    scores = score_at_eos(ScalarHead(rm), ids, attn, position_ids(attn), rollout.mask)
    for i in range(2):
        alone = ids[i][attn[i].bool()].unsqueeze(0)  # the sequence with no padding at all, ending at EOS
        assert alone[0, -1] == eos
        with torch.no_grad():
            expected = rm(input_ids=alone).logits[0, 0]
        torch.testing.assert_close(scores[i], expected, rtol=1e-5, atol=1e-5)
    # reading at the padding after EOS would give something else
    with torch.no_grad():
        padded = rm(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1])).logits[0, 0]
    assert not torch.isclose(padded, scores[0], atol=1e-4)


def test_learns_programmatic_reward(tmp_path, tiny_model_dir):
    # reward = share of the letter 'e' in the response (no reward model; critic from SFT). The random
    # tiny policy starts near 0.13; 30 steps (about 6 s here) reach 0.2-0.4. Stated margin: the mean of
    # the last 10 steps is at least 1.5x that of the first 3 and at least 0.05 higher (met by seeds 0-2:
    # 1.6-2.7x, +0.08 to +0.22; a 3-step window at lr 2e-2 was too noisy to hold across seeds).
    cfg = make_cfg(tmp_path, tiny_model_dir, None, steps=30, rollout_batch_size=16, mini_batch_size=8,
                   grad_accum=1, ppo_epochs=2, max_new_tokens=8, learning_rate=1e-2, critic_learning_rate=2e-2,
                   kl_coef=0.01, reward_fn="ppo_reward:target_share", critic_init="sft",
                   missing_eos_penalty=None, save_steps=100, sample_every=10)
    _, seen = run_ppo(cfg)
    scores = [s["objective/score_raw_mean"] for s in seen]
    first, last = sum(scores[:3]) / 3, sum(scores[-10:]) / 10
    assert last >= 1.5 * first and last >= first + 0.05, [round(s, 3) for s in scores]
    assert all(math.isfinite(s["objective/kl"]) for s in seen)


def test_reused_rollout_forward_gives_the_same_gradients_with_fewer_forwards(tmp_path, tiny_model_dir,
                                                                            tiny_reward_dir, monkeypatch):
    # one rollout of 4 rows, one minibatch of two micro-batches: with reuse the first micro-batch
    # backpropagates through the rollout's own actor and critic forwards; the accumulated gradients at
    # the optimizer step must match those of fresh forwards (up to summation order), with one actor and
    # one critic forward fewer in the update.
    from rlhf import engine
    from rlhf.stages.ppo import update

    grads: dict[bool, list[list[torch.Tensor]]] = {}
    calls: dict[bool, dict[str, int]] = {}
    base_step, base_logits, base_values = engine.step_or_skip, update.response_logprobs, update.values_of
    for reuse in (False, True):
        seen_grads: list[list[torch.Tensor]] = []
        count = {"actor": 0, "critic": 0}

        def step(eng, skip=False, _seen=seen_grads):
            if eng.is_gradient_accumulation_boundary():
                _seen.append([p.grad.clone() for p in eng.module.parameters() if p.grad is not None])
            return base_step(eng, skip)

        def logits(*a, _count=count, **kw):
            _count["actor"] += 1
            return base_logits(*a, **kw)

        def values(*a, _count=count, **kw):
            _count["critic"] += 1
            return base_values(*a, **kw)

        monkeypatch.setattr(engine, "step_or_skip", step)
        monkeypatch.setattr(update, "response_logprobs", logits)
        monkeypatch.setattr(update, "values_of", values)
        cfg = make_cfg(tmp_path / str(reuse), tiny_model_dir, tiny_reward_dir, steps=1, rollout_batch_size=4,
                       mini_batch_size=4, grad_accum=2, ppo_epochs=1, reuse_rollout_forward=reuse)
        _, seen = run_ppo(cfg)
        assert seen[0]["policy/log_ratio_first_absmax"] < 1e-6
        grads[reuse], calls[reuse] = seen_grads, count
    assert calls[False] == {"actor": 2, "critic": 2} and calls[True] == {"actor": 1, "critic": 1}
    assert len(grads[True]) == len(grads[False]) == 2  # actor, then critic
    for fresh, reused in zip(grads[False], grads[True], strict=True):
        assert len(fresh) == len(reused) > 0
        for a, b in zip(fresh, reused, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_sigterm_then_resume_reaches_same_step(tmp_path, tiny_model_dir, tiny_reward_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, tiny_reward_dir, steps=3, ppo_epochs=1)

    def kill_after_first(ctx, stats):
        if ctx.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the step finishes, a checkpoint is saved

    with pytest.raises(StopRequested, match="resume with the same command"):
        run_ppo(cfg, on_step=kill_after_first)
    ckpts = tmp_path / "runs" / "t" / "ppo" / "checkpoints"
    assert artifacts.latest_checkpoint(ckpts).name == "checkpoint-1"
    assert not (tmp_path / "runs" / "t" / "ppo" / "stage.json").exists()
    result, seen = run_ppo(cfg)
    assert [s["step"] for s in seen] == [2, 3]
    assert json.loads((result.final_dir.parent / "stage.json").read_text())["global_step"] == 3
    # extend the same run: resumes at 3 and keeps only the last two checkpoints
    cfg4 = make_cfg(tmp_path, tiny_model_dir, tiny_reward_dir, steps=4, ppo_epochs=1)
    _, seen = run_ppo(cfg4)
    assert [s["step"] for s in seen] == [4]
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-3", "checkpoint-4"]
    steps = [json.loads(line)["step"] for line in (ckpts.parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    samples = [json.loads(line)["step"] for line in (ckpts.parent / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(samples)) == [1, 2, 3, 4] and samples == sorted(samples)  # no duplicates from the stop


def test_lora_actor_uses_disabled_adapters_as_reference(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, None, reward_fn="ppo_reward:target_share", critic_init="sft",
                   ppo_epochs=1, grad_accum=1)
    cfg.model.lora.enabled, cfg.model.lora.r = True, 4
    refs, critic_shares = [], []

    def watch(ctx, stats):
        refs.append(ctx.ref)
        params = list(ctx.critic.module.parameters())
        critic_shares.append(sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params))

    result, seen = run_ppo(cfg, on_step=watch)
    assert refs == [None, None]  # no second copy: ref = actor with adapters off
    assert 0 < critic_shares[0] < 0.2  # the critic follows model.lora: adapters and value head only
    assert seen[0]["objective/kl"] == 0.0  # LoRA B starts at 0, so actor == ref
    assert seen[1]["objective/kl"] != 0.0
    assert not (result.final_dir / "adapter_config.json").exists()  # merged, plain HF causal LM
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.final_dir)


def test_non_finite_reward_stops_with_training_error(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, None, reward_fn="ppo_reward:nan_reward", critic_init="sft")
    with pytest.raises(TrainingError, match=r"^ppo: the reward score of ppo_reward:nan_reward for prompt row '.*' is "
                       r"nan at step 1"):
        run_ppo(cfg)


def test_refuses_a_reward_dir_that_is_not_a_reward_model(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, tiny_model_dir)  # a causal LM where the reward model belongs
    with pytest.raises(ModelError) as err:
        run_ppo(cfg)
    assert "\n" not in str(err.value)


def test_reward_model_with_another_tokenizer_rescored_from_text(tmp_path, tiny_model_dir):
    """Each response is re-encoded from its text with the reward model's own tokenizer and scored by that
    model: the scores PPO saved with its samples are the ones `rlhf.scoring.score` gives them with the
    configured reward model (another model, or the policy's ids fed to this one, would give others)."""
    from rlhf import models, scoring
    from rlhf.tiny import build_tiny_reward

    other = build_tiny_reward(tmp_path / "other_rm", corpus=[f"zebra{i} quokka{i} marmot{i}" for i in range(300)])
    # raw scores in samples.jsonl: no normalisation, no missing-EOS penalty
    cfg = make_cfg(tmp_path, tiny_model_dir, other, critic_init="sft", steps=1, ppo_epochs=1,
                   normalize_reward=False, missing_eos_penalty=None)
    result, seen = run_ppo(cfg)
    assert seen[0]["objective/score_raw_std"] > 0
    samples = [json.loads(line) for line in (result.final_dir.parent / "samples.jsonl").read_text().splitlines()]
    tokenizer = models.load_tokenizer(str(other))
    reward = models.load_scalar_model(str(other), tokenizer=tokenizer, require_head=True).eval()
    prompts = [[{"role": "user", "content": s["prompt"]}] for s in samples]  # one user turn, as make_cfg writes
    expected = scoring.score(reward, tokenizer, prompts, [s["response"] for s in samples])
    assert len(samples) == 3 and [s["score"] for s in samples] == pytest.approx(expected, rel=1e-4, abs=1e-5)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
