"""rlhf export: a LoRA DPO checkpoint (merged, and kept as an adapter), a plain PPO checkpoint (actor and
critic), a full-weights Trainer checkpoint; each loads with `from_pretrained` and computes what the live
model computes; a critic-free PPO run's actor. Refusals: incomplete checkpoints, a non-empty --out, a reward
model or critic where a causal LM is asked for, --adapter-only without LoRA, the critic of a critic-free run.
(ZeRO-3 PPO: tests/distributed/test_ppo_zero3.py.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli_env, run_cli, tiny_cfg
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf import artifacts, engine, models
from rlhf.commands.export import export
from rlhf.config import save_resolved
from rlhf.errors import ArtifactError, ConfigError, ModelError
from rlhf.stages import run_stage
from rlhf.stages.common import StageRun

FAST = ["logging.tensorboard=false", "logging.plots=false"]
TEXT = "Why is the sky blue? Sunlight scatters in the air."


def _finished(run_dir: Path, stage: str, src: Path) -> Path:
    shutil.copytree(src, run_dir / stage / "final")
    artifacts.write_manifest(run_dir / stage, stage, inputs={}, config_hash="test", metrics={})
    return run_dir / stage / "final"


def _start(cfg, stage: str) -> None:
    """What a stage does when it starts (claim its dir, write config.resolved.yaml), then let the dir go."""
    run = StageRun(cfg, stage)
    run.metrics.close()
    if run.claim is not None:
        run.claim.release()


def _logits(model_or_dir, auto=AutoModelForCausalLM, tokenizer_dir=None) -> torch.Tensor:
    model = auto.from_pretrained(model_or_dir) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or model_or_dir)
    with torch.no_grad():
        return model.eval()(**tok(TEXT, return_tensors="pt")).logits


def _only_safe_files(out: Path) -> None:
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


def test_lora_dpo_checkpoint_exports_merged_and_as_adapter(tmp_path, rlhf_cache, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, ["dpo.max_steps=2", "dpo.save_steps=2", "dpo.learning_rate=5e-3",
                              "model.lora.enabled=true", "model.lora.r=4", *FAST])
    _finished(cfg.run.dir, "sft", tiny_model_dir)
    final = run_stage("dpo", cfg).final_dir  # trained to the step of the checkpoint: the live model
    ckpt = cfg.stage_dir("dpo") / "checkpoints" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    live = _logits(final)
    assert not torch.allclose(live, _logits(tiny_model_dir), atol=1e-4)  # the adapter changed the model

    merged = export(ckpt, tmp_path / "merged")
    _only_safe_files(merged)
    assert models.model_kind(str(merged)) == "causal_lm"
    torch.testing.assert_close(_logits(merged), live, rtol=0, atol=1e-6)

    adapter = export(ckpt, tmp_path / "adapter", adapter_only=True)
    _only_safe_files(adapter)
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    torch.testing.assert_close(_logits(adapter), live, rtol=0, atol=1e-5)  # base + adapter, not merged

    moved = tmp_path / "moved"  # adapter_config.json names the old sft path: the run's own sft stage is used
    shutil.move(cfg.run.dir.parent, moved)
    again = export(moved / "tiny" / "dpo" / "checkpoints" / "checkpoint-2", tmp_path / "again")
    torch.testing.assert_close(_logits(again), live, rtol=0, atol=1e-6)


def _ppo_checkpoint(tmp_path: Path, policy: Path, reward: Path, overrides: tuple[str, ...] = ()) -> tuple[Path, dict]:
    """A PPO run dir with checkpoint-1 written by `engine.save_engine` (plain engines) from perturbed copies
    of the sft and reward models (as `rlhf.stages.ppo.build_models` builds them); returns it and the live
    models."""
    from rlhf.forwards import ScalarHead

    cfg = tiny_cfg(tmp_path, [*FAST, *overrides])
    sft_dir = _finished(cfg.run.dir, "sft", policy)
    reward_dir = _finished(cfg.run.dir, "reward", reward)
    _start(cfg, "ppo")  # writes <run>/ppo/config.resolved.yaml
    ckpt = cfg.stage_dir("ppo") / "checkpoints" / "checkpoint-1"
    tok = models.load_tokenizer(str(sft_dir))
    lora = models.lora_dict(cfg.model.lora)
    live = {"actor": models.load_causal_lm(str(sft_dir), tokenizer=tok, lora=lora),
            "critic": models.load_scalar_model(str(reward_dir), tokenizer=tok, require_head=False, lora=lora)}
    torch.manual_seed(0)
    for role, model in live.items():
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:  # trained weights (LoRA: the adapters) differ from the stage inputs
                    param.add_(0.05 * torch.randn_like(param))
        trained = model if role == "actor" else ScalarHead(model)  # the critic's engine trains a ScalarHead
        eng = engine.PlainEngine(trained, torch.optim.AdamW(trained.parameters()))
        engine.save_engine(eng, ckpt / role)
    artifacts.mark_checkpoint_complete(ckpt, 1)
    return ckpt, live


def test_plain_ppo_checkpoint_exports_actor_and_critic(tmp_path, rlhf_cache, tiny_model_dir, tiny_reward_dir):
    ckpt, live = _ppo_checkpoint(tmp_path, tiny_model_dir, tiny_reward_dir)
    assert (ckpt.parent.parent / "config.resolved.yaml").is_file() and not (ckpt.parent.parent / "stage.json").exists()
    actor = export(ckpt, tmp_path / "actor")
    _only_safe_files(actor)
    torch.testing.assert_close(_logits(actor), _logits(live["actor"], tokenizer_dir=actor), rtol=0, atol=0)
    critic = export(ckpt / "critic", tmp_path / "critic")  # the role's own dir names the role
    assert models.model_kind(str(critic)) == "sequence_classification"
    torch.testing.assert_close(_logits(critic, AutoModelForSequenceClassification),
                               _logits(live["critic"], tokenizer_dir=critic), rtol=0, atol=0)
    with pytest.raises(ModelError, match="PPO critic.*not a causal LM.*actor"):
        export(ckpt, tmp_path / "chat", role="critic", causal_lm=True)
    with pytest.raises(ConfigError, match="--adapter-only.*no LoRA adapter"):
        export(ckpt, tmp_path / "adapter", adapter_only=True)
    (ckpt.parent.parent / "config.resolved.yaml").unlink()  # a run from before the stage saved it on start
    with pytest.raises(ConfigError, match="--config FILE"):
        export(ckpt, tmp_path / "no_config")


def test_lora_ppo_checkpoint_exports_merged_and_as_adapter(tmp_path, rlhf_cache, tiny_model_dir, tiny_reward_dir):
    ckpt, live = _ppo_checkpoint(tmp_path, tiny_model_dir, tiny_reward_dir, ("model.lora.enabled=true", "model.lora.r=4"))
    merged = export(ckpt, tmp_path / "merged")
    assert models.model_kind(str(merged)) == "causal_lm"
    expected = _logits(live["actor"], tokenizer_dir=merged)
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-5)
    adapter = export(ckpt, tmp_path / "adapter", adapter_only=True)
    assert (adapter / "adapter_config.json").is_file()
    torch.testing.assert_close(_logits(adapter), expected, rtol=0, atol=1e-6)
    critic = export(ckpt, tmp_path / "critic", role="critic")  # SEQ_CLS LoRA, merged with its score head
    torch.testing.assert_close(_logits(critic, AutoModelForSequenceClassification),
                               _logits(live["critic"], tokenizer_dir=critic), rtol=0, atol=1e-5)


def test_a_critic_free_ppo_checkpoint_exports_its_actor_and_refuses_a_critic(tmp_path, tiny_model_dir):
    # one step of grpo with a program for the reward: checkpoint-1 holds actor/ alone, which exports as the
    # final policy; --role critic (or the critic/ path) is one line naming the estimator, exit 2
    from test_ppo import make_cfg, run_ppo

    cfg = make_cfg(tmp_path, tiny_model_dir, None, steps=1, ppo_epochs=1, grad_accum=1, rollout_batch_size=2,
                   mini_batch_size=4, advantage="grpo", samples_per_prompt=2,
                   reward_fn="ppo_reward:target_share")
    result, _ = run_ppo(cfg)
    ckpt = cfg.stage_dir("ppo") / "checkpoints" / "checkpoint-1"
    assert (ckpt / "actor").is_dir() and not (ckpt / "critic").exists()
    actor = export(ckpt, tmp_path / "actor")
    torch.testing.assert_close(_logits(actor), _logits(result.final_dir), rtol=0, atol=0)
    for path, role in ((ckpt, "critic"), (ckpt / "critic", None)):
        with pytest.raises(ConfigError) as err:
            export(path, tmp_path / "critic", role=role)
        assert str(err.value) == (f"{ckpt}: no critic to export: the run trained none (ppo.advantage: grpo); "
                                  "--role actor exports the policy")


def test_trainer_checkpoint_and_refusals(tmp_path, tiny_model_dir, tiny_reward_dir):
    run_dir = tmp_path / "runs" / "t"
    sft_ckpt = run_dir / "sft" / "checkpoints" / "checkpoint-3"
    shutil.copytree(tiny_model_dir, sft_ckpt)  # a Trainer checkpoint: save_pretrained files, no marker yet
    with pytest.raises(ArtifactError, match="incomplete checkpoint.*there is no complete one"):
        export(sft_ckpt, tmp_path / "out")
    artifacts.mark_checkpoint_complete(sft_ckpt, 3)
    (sft_ckpt / "training_args.bin").write_bytes(b"not loaded")  # the Trainer's pickles stay behind
    out = export(sft_ckpt, tmp_path / "sft")
    _only_safe_files(out)
    torch.testing.assert_close(_logits(out), _logits(tiny_model_dir), rtol=0, atol=0)
    reward_ckpt = run_dir / "reward" / "checkpoints" / "checkpoint-2"
    shutil.copytree(tiny_reward_dir, reward_ckpt)
    artifacts.mark_checkpoint_complete(reward_ckpt, 2)
    assert models.model_kind(str(export(reward_ckpt, tmp_path / "rm"))) == "sequence_classification"
    with pytest.raises(ModelError, match="reward-model checkpoint.*not a causal LM"):
        export(reward_ckpt, tmp_path / "rm_lm", causal_lm=True)
    with pytest.raises(ConfigError, match="only PPO checkpoints hold a critic"):
        export(sft_ckpt, tmp_path / "critic", role="critic")
    # The command: one line and exit 2 for an existing non-empty --out and for a reward model as an actor.
    for args, message in ((["--checkpoint", str(sft_ckpt), "--out", str(out)], "already exists and is not empty"),
                          (["--checkpoint", str(reward_ckpt), "--out", str(tmp_path / "x"), "--role", "actor"],
                           "not a causal LM")):
        proc = run_cli(["export", *args], env=cli_env())
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [proc.stderr.strip()
                                                                                          .splitlines()[-1]]
    assert not (tmp_path / "x").exists()


def test_a_stage_saves_its_resolved_config_when_it_starts(tmp_path):
    cfg = tiny_cfg(tmp_path, FAST)
    _start(cfg, "sft")
    saved = cfg.stage_dir("sft") / "config.resolved.yaml"
    other = tmp_path / "again.yaml"
    save_resolved(cfg, other)
    assert saved.read_text() == other.read_text()
