"""ORPO stage: the loss the trainer optimises equals the paper's formula on a hand-computed example, the
held-out log odds ratio rises on the tiny fixture, artifacts follow the contract, LoRA and resume work,
and `final_stage: orpo` runs ORPO alone."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from helpers import cli_env, run_cli, tiny_cfg, tiny_raw, write_cfg

from rlhf import artifacts, models
from rlhf.stages import run_stage
from rlhf.tracking import read_metrics

FAST = ["logging.tensorboard=false", "logging.plots=false"]


class BigramModel(torch.nn.Module):
    """p(next token) is the same fixed distribution after every token: [0.1, 0.2, 0.3, 0.4] over ids 0-3."""

    def __init__(self):
        super().__init__()
        probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
        self.table = torch.nn.Parameter(probs.log().repeat(4, 1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        logits = self.table[input_ids]  # like an HF causal LM: the last `logits_to_keep` positions (0: all)
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()


def test_orpo_trainer_loss_equals_the_formula_on_a_hand_computed_pair(tmp_path):
    from transformers import TrainingArguments

    from rlhf.stages.orpo import collate_pairs, make_trainer

    # prompt [1]; chosen response [3, 3]: p = 0.4 per token, mean log p = log 0.4
    # rejected response [2, 1]: p = 0.3 then 0.2, mean log p = log sqrt(0.06) = log 0.244949
    features = [{"chosen_ids": [1, 3, 3], "chosen_mask": [0, 1, 1], "rejected_ids": [1, 2, 1],
                 "rejected_mask": [0, 1, 1]},
                {"chosen_ids": [1, 3, 3], "chosen_mask": [0, 1, 1], "rejected_ids": [1, 2],  # padded to 3
                 "rejected_mask": [0, 1]}]
    # second pair: rejected [2] alone, mean log p = log 0.3
    lam = 0.5
    nll = -math.log(0.4)                                     # 0.916291 for both pairs
    log_odds_chosen = math.log(0.4 / 0.6)                    # -0.405465
    log_odds_rej = [math.log(0.244949 / 0.755051),           # -1.125735
                    math.log(0.3 / 0.7)]                     # -0.847298
    ratios = [log_odds_chosen - r for r in log_odds_rej]     # 0.720270, 0.441833
    or_terms = [math.log1p(math.exp(-h)) for h in ratios]    # -log sigmoid(h): 0.396506, 0.496437
    expected = nll + lam * sum(or_terms) / 2                 # 0.916291 + 0.5 * 0.446471 = 1.139526
    assert expected == pytest.approx(1.139526, abs=1e-5)

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    trainer = make_trainer(lam, model=BigramModel(), args=args, train_dataset=features,
                           data_collator=collate_pairs(pad_id=0))
    batch = collate_pairs(pad_id=0)(features)
    assert batch["input_ids"].tolist() == [[1, 3, 3], [1, 3, 3], [1, 2, 1], [1, 2, 0]]
    loss = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss, torch.tensor(expected), atol=1e-5, rtol=0)
    stats = trainer._stats["train"]
    assert stats["orpo/log_odds_ratio"][0] == pytest.approx(sum(ratios) / 2, abs=1e-5)
    assert stats["orpo/nll"][0] == pytest.approx(nll, abs=1e-5) and stats["orpo/accuracy"][0] == 1.0
    loss.backward()  # gradient flows through both terms
    assert trainer.model.table.grad.abs().sum() > 0


@pytest.mark.slow
def test_orpo_raises_heldout_log_odds_ratio(tmp_path, rlhf_cache):
    cfg = tiny_cfg(tmp_path, ["final_stage=orpo", "orpo.max_steps=8", "orpo.learning_rate=3e-3",
                              "orpo.logging_steps=2", "orpo.save_steps=4", "logging.tensorboard=false"])
    result = run_stage("orpo", cfg)
    manifest = artifacts.read_manifest(cfg.stage_dir("orpo"))
    m = manifest["metrics"]
    print(f"held-out log odds ratio {m['heldout_log_odds_ratio_before']:.3f} -> {m['heldout_log_odds_ratio_after']:.3f}, "
          f"accuracy {m['heldout_accuracy_before']:.3f} -> {m['heldout_accuracy_after']:.3f}, "
          f"chosen NLL {m['heldout_nll_before']:.3f} -> {m['heldout_nll_after']:.3f} ({m['eval_pairs']} pairs)")
    # Stated margin: the mean held-out log odds ratio rises by at least 0.5 nats (measured: -0.009 -> 0.775)
    # and at least 80% of the pairs end up with a positive ratio (measured: 0.385 -> 1.0).
    assert m["heldout_log_odds_ratio_after"] > m["heldout_log_odds_ratio_before"] + 0.5
    assert m["heldout_accuracy_after"] >= 0.8
    assert m["heldout_nll_after"] < m["heldout_nll_before"]  # the SFT term learns the chosen responses too
    final = result.final_dir
    assert (final / "model.safetensors").is_file() and (final / "config.resolved.yaml").is_file()
    assert (final / "tokenizer.json").is_file() and manifest["global_step"] == 8
    assert manifest["inputs"]["model"] == models.resolve_model("tiny-random")
    logged = [r for r in read_metrics(cfg.stage_dir("orpo") / "metrics.jsonl") if "orpo/log_odds_ratio" in r]
    assert len(logged) == 4 and all(math.isfinite(r["loss"]) for r in logged)
    assert (cfg.stage_dir("orpo") / "curves.png").is_file()


@pytest.mark.slow
def test_orpo_lora_and_resume(tmp_path, rlhf_cache):
    sets = ["final_stage=orpo", "orpo.save_steps=2", "model.lora.enabled=true", "model.lora.r=4", *FAST]
    cfg = tiny_cfg(tmp_path, ["orpo.max_steps=4", *sets])
    run_stage("orpo", cfg)
    (cfg.stage_dir("orpo") / artifacts.MANIFEST).unlink()  # as if stopped after the step-2 checkpoint
    shutil.rmtree(cfg.stage_dir("orpo") / "checkpoints" / "checkpoint-4")
    final = run_stage("orpo", cfg).final_dir
    assert artifacts.read_manifest(cfg.stage_dir("orpo"))["global_step"] == 4
    steps = [r["step"] for r in read_metrics(cfg.stage_dir("orpo") / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert not (final / "adapter_config.json").exists() and models.model_kind(str(final)) == "causal_lm"
    models.load_causal_lm(str(final))


def test_orpo_lora_runs_are_repeatable(tmp_path, rlhf_cache):
    """The adapters are initialised from run.seed: two runs of one config train the same weights (before,
    the random half of each adapter followed whatever the process had drawn before the model was built)."""
    from safetensors.torch import load_file

    sets = ["final_stage=orpo", "orpo.max_steps=2", "model.lora.enabled=true", "model.lora.r=4", *FAST]
    weights = []
    for name in ("first", "second"):
        torch.manual_seed(len(name))  # a different process state before each run
        final = run_stage("orpo", tiny_cfg(tmp_path / name, sets)).final_dir
        weights.append(load_file(final / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow
def test_pipeline_final_stage_orpo_runs_orpo_alone(tmp_path, rlhf_cache):
    config = write_cfg(tmp_path, tiny_raw(tmp_path))
    sets = ["final_stage=orpo", "orpo.max_steps=2", *FAST]
    proc = run_cli(["pipeline", "--config", str(config)] + [x for s in sets for x in ("--set", s)],
                   env=cli_env(rlhf_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert artifacts.is_complete(run_dir / "orpo")
    assert sorted(p.name for p in run_dir.iterdir()) == ["orpo"]
