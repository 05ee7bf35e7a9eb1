"""Trained models keep fp32 master weights when the run's dtype is bfloat16, on every path without DeepSpeed.

A bf16 weight of size ~0.02 has a spacing of ~1.2e-4, so an AdamW step of ~1e-6 (PPO's and DPO's default
learning rates) rounds away: 100 such steps applied to bf16 weights in place leave nearly all of them as
they were (measured: 98% unchanged). With fp32 masters every weight that has a gradient moves. Each test
trains 100 steps at lr 1e-6 with a bf16 model dtype and counts the share of weight elements that moved.
"""

from __future__ import annotations

import torch
from helpers import tiny_cfg
from safetensors.torch import load_file

MIN_MOVED = 0.9


def moved_share(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Share of the elements of the 2-D (and larger) weights that differ."""
    changed = total = 0
    for name, old in before.items():
        if old.dim() < 2:
            continue
        changed += int((after[name].float() != old.float()).sum())
        total += old.numel()
    return changed / total


def test_plain_ppo_engine_trains_fp32_masters_of_a_bf16_model(tmp_path, tiny_model_dir, tiny_reward_dir):
    from rlhf import engine
    from rlhf.models import load_tokenizer
    from rlhf.stages.ppo import build_models

    cfg = tiny_cfg(tmp_path, ["model.dtype=bfloat16", "ppo.learning_rate=1e-6", "deepspeed.enabled=false",
                              "ppo.grad_accum=1", "ppo.max_grad_norm=0"])
    tok = load_tokenizer(str(tiny_model_dir), padding_side="left")
    built = build_models(cfg, str(tiny_model_dir), str(tiny_reward_dir), tok, torch.device("cpu"))
    actor, ref = built["actor"], built["ref"]
    # the module computes in bf16, like the frozen reference; the optimizer holds float32 weights
    assert {p.dtype for p in actor.module.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in ref.module.parameters()} == {torch.bfloat16}
    assert {p.dtype for g in actor.optimizer.param_groups for p in g["params"]} == {torch.float32}
    engine.save_engine(actor, tmp_path / "before")
    before = load_file(tmp_path / "before" / "model.safetensors")
    assert {t.dtype for t in before.values() if t.is_floating_point()} == {torch.float32}

    ids = torch.arange(64, device="cpu").reshape(1, 64) * 7 % tok.vocab_size  # the same batch every step
    for _ in range(100):  # the same gradient direction each step: AdamW moves each weight by ~lr
        loss = actor(input_ids=ids).logits.float().mean()
        actor.backward(loss)
        actor.step()
    engine.save_engine(actor, tmp_path / "after")
    after = load_file(tmp_path / "after" / "model.safetensors")
    share = moved_share(before, after)
    assert share >= MIN_MOVED, f"only {share:.1%} of the trained weights moved"

    # a resumed engine gets the masters back exactly, not their bf16 rounding
    again = build_models(cfg, str(tiny_model_dir), str(tiny_reward_dir), tok, torch.device("cpu"))["actor"]
    engine.load_engine(again, tmp_path / "after")
    engine.save_engine(again, tmp_path / "again")
    for name, tensor in load_file(tmp_path / "again" / "model.safetensors").items():
        torch.testing.assert_close(tensor, after[name], rtol=0, atol=0)
    for p, q in zip(again.module.parameters(), actor.module.parameters(), strict=True):
        assert torch.equal(p, q)


def _trainer_stage_moves_weights(tmp_path, stage: str, base_dir) -> float:
    from rlhf.stages import dpo, reward, sft

    stages = {"sft": sft, "reward": reward, "dpo": dpo}
    sets = ["model.dtype=bfloat16", "deepspeed.enabled=false", f"{stage}.learning_rate=1e-6",
            f"{stage}.max_steps=100", f"{stage}.save_steps=1000", f"{stage}.warmup_ratio=0",
            f"{stage}.lr_scheduler=constant", f"{stage}.max_grad_norm=0", "logging.plots=false"]
    cfg = tiny_cfg(tmp_path, sets)
    if stage == "dpo":  # DPO starts from an SFT output: the tiny model stands in for it
        sft_dir = cfg.stage_dir("sft")
        sft_dir.mkdir(parents=True)
        import shutil

        from rlhf import artifacts

        shutil.copytree(base_dir, sft_dir / "final")
        artifacts.write_manifest(sft_dir, "sft", inputs={}, config_hash=cfg.hash(), metrics={}, global_step=0)
    result = stages[stage].run(cfg)
    weights = load_file(result.final_dir / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    base = load_file(next(base_dir.glob("*.safetensors")))
    return moved_share({k: v for k, v in base.items() if k in weights}, weights)


def test_sft_trains_fp32_weights_of_a_bf16_model(tmp_path, tiny_model_dir):
    from rlhf.models import resolve_model

    share = _trainer_stage_moves_weights(tmp_path, "sft", type(tiny_model_dir)(resolve_model("tiny-random")))
    assert share >= MIN_MOVED, f"only {share:.1%} of the trained weights moved"


def test_dpo_trains_fp32_weights_of_a_bf16_model(tmp_path, tiny_model_dir):
    share = _trainer_stage_moves_weights(tmp_path, "dpo", tiny_model_dir)
    assert share >= MIN_MOVED, f"only {share:.1%} of the trained weights moved"
