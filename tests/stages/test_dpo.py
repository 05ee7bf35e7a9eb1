"""DPO stage on the tiny fixture: held-out implicit-reward accuracy rises, artifacts follow the contract,
the configured loss variant is the one trained, LoRA runs, a stopped run resumes, and `final_stage: dpo`
runs SFT then DPO only.

The SFT input is faked as in test_ppo.py: the tiny fixture model copied into <run>/sft/final with its
manifest. Data: data/tiny/preference.jsonl (separable pairs), 20% held out.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import ROOT, cli_env, run_cli, tiny_cfg, tiny_raw, write_cfg
from safetensors.torch import load_file

from rlhf import artifacts, models
from rlhf.stages import run_stage
from rlhf.tracking import read_metrics

pytestmark = pytest.mark.slow
FAST = ["logging.tensorboard=false", "logging.plots=false"]


def fake_sft(cfg, policy_dir) -> None:
    sft = cfg.stage_dir("sft")
    shutil.copytree(policy_dir, sft / "final")
    artifacts.write_manifest(sft, "sft", inputs={}, config_hash="test", metrics={})


def test_dpo_raises_heldout_implicit_reward_accuracy(tmp_path, rlhf_cache, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, ["dpo.max_steps=8", "dpo.learning_rate=5e-4", "dpo.logging_steps=2",
                              "dpo.save_steps=4", "logging.tensorboard=false"])
    fake_sft(cfg, tiny_model_dir)
    from rlhf.data import load_rows
    from rlhf.forwards import pair_logps
    from rlhf.stages import dpo

    _, held_out, _ = load_rows(cfg, "dpo", "preference")
    tok = models.load_tokenizer(str(tiny_model_dir))
    sft_model = models.load_causal_lm(str(tiny_model_dir), tokenizer=tok).eval()
    logps = pair_logps(sft_model, tok, held_out)
    before = dpo.rewards_report(logps, logps, cfg.dpo.beta)  # the policy is its reference
    result = run_stage("dpo", cfg)
    manifest = artifacts.read_manifest(cfg.stage_dir("dpo"))
    after = manifest["metrics"]
    print(f"held-out implicit-reward accuracy {before['rewards/accuracy']:.3f} -> "
          f"{after['heldout_rewards/accuracy']:.3f}, margin {before['rewards/margin']:.3f} -> "
          f"{after['heldout_rewards/margin']:.3f} ({len(held_out)} pairs)")
    # Policy == reference: every implicit reward is 0, so no pair is ranked right and the margin is 0.
    assert before["rewards/accuracy"] == 0.0 and before["rewards/margin"] == 0.0
    # Stated margin: after 8 steps at least 80% of the held-out pairs are ranked right (measured: 1.0), with a
    # mean implicit-reward margin above 0.05 (measured: 0.88).
    assert after["heldout_rewards/accuracy"] >= 0.8
    assert after["heldout_rewards/margin"] > 0.05
    assert after["heldout_loss"] < before["loss"]  # -log sigmoid(0) = 0.693 before
    assert after["trl_eval_rewards/accuracies"] >= 0.8  # TRL's own held-out figure agrees
    # Artifact contract: final/ holds safetensors, tokenizer and the resolved config; stage.json last.
    final = result.final_dir
    assert (final / "model.safetensors").is_file() and (final / "config.resolved.yaml").is_file()
    assert (final / "tokenizer.json").is_file() and not list(final.glob("*.bin"))
    assert manifest["stage"] == "dpo" and manifest["global_step"] == 8
    assert manifest["inputs"]["model"] == str(cfg.stage_dir("sft") / "final")
    logged = [r for r in read_metrics(cfg.stage_dir("dpo") / "metrics.jsonl") if "rewards/accuracies" in r]
    assert logged and all("rewards/margins" in r for r in logged)
    base, tuned = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert all(not torch.equal(base[k], tuned[k]) for k in base)  # every tensor trained
    assert artifacts.latest_checkpoint(cfg.stage_dir("dpo") / "checkpoints") is not None


# The first step's loss is computed before any update, with the policy equal to its reference: every pair's
# log-ratio margin h is 0. sigmoid: -log sigmoid(0) = log 2 = 0.693; ipo: (h - 1/(2 beta))^2 = (1/0.2)^2 = 25
# at beta 0.1; hinge: max(0, 1 - beta h) = 1. So the logged value names the loss TRL ran.
@pytest.mark.parametrize(("loss_type", "first_loss"), [("ipo", 25.0), ("hinge", 1.0)])
def test_dpo_trains_with_the_configured_loss(tmp_path, rlhf_cache, tiny_model_dir, loss_type, first_loss):
    cfg = tiny_cfg(tmp_path, ["dpo.max_steps=2", f"dpo.loss_type={loss_type}", *FAST])
    assert cfg.dpo.beta == 0.1
    fake_sft(cfg, tiny_model_dir)
    run_stage("dpo", cfg)
    assert artifacts.read_manifest(cfg.stage_dir("dpo"))["global_step"] == 2
    (first,) = [r for r in read_metrics(cfg.stage_dir("dpo") / "metrics.jsonl") if r["step"] == 1 and "loss" in r]
    assert first["loss"] == pytest.approx(first_loss, rel=1e-5)


def test_dpo_lora_with_precomputed_reference_saves_a_merged_model(tmp_path, rlhf_cache, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, ["dpo.max_steps=3", "dpo.precompute_ref_log_probs=true", "model.lora.enabled=true",
                              "model.lora.r=4", *FAST])
    fake_sft(cfg, tiny_model_dir)
    final = run_stage("dpo", cfg).final_dir
    assert not (final / "adapter_config.json").exists()
    assert models.model_kind(str(final)) == "causal_lm"
    assert (cfg.stage_dir("dpo") / "data" / "train").is_dir()  # file-backed pairs for the reference cache
    models.load_causal_lm(str(final))


def test_dpo_resumes_from_its_last_checkpoint(tmp_path, rlhf_cache, tiny_model_dir):
    cfg = tiny_cfg(tmp_path, ["dpo.max_steps=4", "dpo.save_steps=2", *FAST])
    fake_sft(cfg, tiny_model_dir)
    run_stage("dpo", cfg)
    (cfg.stage_dir("dpo") / artifacts.MANIFEST).unlink()  # as if stopped after checkpoint-2
    shutil.rmtree(cfg.stage_dir("dpo") / "checkpoints" / "checkpoint-4")
    run_stage("dpo", cfg)
    assert artifacts.read_manifest(cfg.stage_dir("dpo"))["global_step"] == 4
    steps = [r["step"] for r in read_metrics(cfg.stage_dir("dpo") / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_dpo_without_sft_output_names_the_command(tmp_path, rlhf_cache):
    from rlhf.errors import ArtifactError

    cfg = tiny_cfg(tmp_path, ["final_stage=dpo"])
    with pytest.raises(ArtifactError, match="rlhf sft"):
        from rlhf.stages import dpo

        dpo.run(cfg)


def test_pipeline_final_stage_dpo_runs_sft_then_dpo_and_no_reward(tmp_path, rlhf_cache):
    raw = tiny_raw(tmp_path)
    config = write_cfg(tmp_path, raw)
    sets = ["final_stage=dpo", "sft.max_steps=2", "dpo.max_steps=2", "logging.tensorboard=false",
            "logging.plots=false"]
    args = ["pipeline", "--config", str(config)] + [x for s in sets for x in ("--set", s)]
    proc = run_cli(args, env=cli_env(rlhf_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is_gradient_checkpointing" not in proc.stderr  # libraries' deprecation noise is filtered
    run_dir = tmp_path / "runs" / "tiny"
    assert artifacts.is_complete(run_dir / "sft") and artifacts.is_complete(run_dir / "dpo")
    assert not (run_dir / "reward").exists() and not (run_dir / "ppo").exists()
    assert artifacts.read_manifest(run_dir / "dpo")["inputs"]["model"] == str(run_dir / "sft" / "final")


def test_dpo_trains_on_ultrafeedback_style_pairs(tmp_path, rlhf_cache, tiny_model_dir):
    """data/tiny/preference.jsonl rewritten in the UltraFeedback-binarized layout (prompt, chosen/rejected
    conversations that repeat it, a `messages` column, scores)."""
    rows = [json.loads(line) for line in (ROOT / "data" / "tiny" / "preference.jsonl").read_text().splitlines()[:40]]
    uf = tmp_path / "uf.jsonl"
    with uf.open("w") as fh:
        for i, row in enumerate(rows):
            user = {"role": "user", "content": row["prompt"]}
            chosen = [user, {"role": "assistant", "content": row["chosen"]}]
            fh.write(json.dumps({"prompt": row["prompt"], "prompt_id": str(i), "chosen": chosen, "messages": chosen,
                                 "rejected": [user, {"role": "assistant", "content": row["rejected"]}],
                                 "score_chosen": 8.0, "score_rejected": 3.0}) + "\n")
    cfg = tiny_cfg(tmp_path, ["dpo.max_steps=2", f"data.preference={uf}", *FAST])
    fake_sft(cfg, tiny_model_dir)
    from rlhf.data import load_rows

    train, _, _ = load_rows(cfg, "dpo", "preference")
    assert train[0]["prompt"] == [{"role": "user", "content": train[0]["prompt"][0]["content"]}]
    assert len(train[0]["chosen"]) == 1 and train[0]["margin"] == 5.0
    run_stage("dpo", cfg)
    manifest = artifacts.read_manifest(cfg.stage_dir("dpo"))
    assert manifest["global_step"] == 2 and manifest["inputs"]["data"] == str(uf)
