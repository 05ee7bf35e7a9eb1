"""DPO and ORPO under `deepspeed --num_gpus 2` on CPU with ZeRO-3 (and ORPO with ZeRO-2): train, checkpoint,
save, and the saved model loads in a single process with full (gathered) weights. DPO's held-out check,
split over the two ranks, reports what one process computes on all rows. `rlhf export` rebuilds ORPO's
last checkpoint from its ZeRO-2/3 shards alone."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from rlhf import artifacts, models
from rlhf.config import load_config
from rlhf.data import load_rows
from rlhf.forwards import pair_logps
from rlhf.stages import dpo

sys.path.insert(0, str(Path(__file__).parent))
from launch import deepspeed_cli  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, final_stage: str, model: str, section: dict, zero_stage: int = 3) -> Path:
    raw = {"run": {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
           "model": {"name_or_path": model},
           "data": {"preference": str(ROOT / "data/tiny/preference.jsonl"), "eval_fraction": 0.1,
                    "max_length": 96},
           "final_stage": final_stage,
           final_stage: {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2, "grad_accum": 2,
                         "eval_batch_size": 4, "save_steps": 2, **section},
           "deepspeed": {"enabled": True, "zero_stage": zero_stage},
           "logging": {"progress": False, "tensorboard": False, "plots": False}}
    path = tmp_path / f"{final_stage}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _check_saved(stage_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    manifest = artifacts.read_manifest(stage_dir)
    assert manifest["global_step"] == 2
    ckpt = artifacts.latest_checkpoint(stage_dir / "checkpoints")
    assert ckpt is not None and (ckpt / "global_step2").is_dir()  # a DeepSpeed (sharded) checkpoint
    model = AutoModelForCausalLM.from_pretrained(stage_dir / "final")
    assert all(p.numel() > 0 for p in model.parameters())  # gathered, not ZeRO-3 shards
    return manifest["metrics"]


@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed_ref", "ref_engine"])
def test_dpo_zero3_two_ranks(tmp_path, tiny_model_dir, precompute):
    # precomputed: the pairs are file-backed so both ranks read the reference cache file rank 0 writes into
    # the dataset's directory (an in-memory dataset's would be in a per-process temporary directory);
    # otherwise TRL's frozen reference copy is a ZeRO-3 inference engine of its own.
    sft = tmp_path / "runs" / "t" / "sft"
    shutil.copytree(tiny_model_dir, sft / "final")
    artifacts.write_manifest(sft, "sft", inputs={}, config_hash="test", metrics={})
    config = _config(tmp_path, "dpo", str(tiny_model_dir), {"precompute_ref_log_probs": precompute, "beta": 0.1})
    proc = deepspeed_cli(["dpo", "--config", str(config)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = _check_saved(tmp_path / "runs" / "t" / "dpo")
    assert 0.0 <= metrics["heldout_rewards/accuracy"] <= 1.0
    # Rank 0 scored pairs 0-7, rank 1 pairs 8-12 (whole batches of eval_batch_size 4); one process agrees.
    _, eval_rows, _ = load_rows(load_config(config), "dpo", "preference")
    tok = models.load_tokenizer(str(tmp_path / "runs" / "t" / "dpo" / "final"))
    policy, ref = (models.load_causal_lm(str(d / "final"), tokenizer=tok).eval()
                   for d in (tmp_path / "runs" / "t" / "dpo", sft))
    expected = dpo.rewards_report(pair_logps(policy, tok, eval_rows), pair_logps(ref, tok, eval_rows), 0.1)
    assert len(eval_rows) == 13 and expected["rewards/accuracy"] == metrics["heldout_rewards/accuracy"]
    for key, value in expected.items():
        assert metrics[f"heldout_{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_orpo_zero3_two_ranks(tmp_path, tiny_model_dir):
    # ZeRO-3 only: a Trainer stage under ZeRO-2 is test_sft_deepspeed_files' zero2_offload case, and merging
    # ZeRO-2 shards for export (`engine.deepspeed_state_dict`, shared with PPO) is test_ppo_offload_plain's
    config = _config(tmp_path, "orpo", str(tiny_model_dir), {"beta": 0.1}, zero_stage=3)
    proc = deepspeed_cli(["orpo", "--config", str(config)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = _check_saved(tmp_path / "runs" / "t" / "orpo")
    assert metrics["heldout_log_odds_ratio_after"] is not None
    _check_export_from_shards(tmp_path / "runs" / "t" / "orpo", tmp_path)


def _check_export_from_shards(stage_dir: Path, tmp_path: Path) -> None:
    """`rlhf export` of the last checkpoint without its gathered model.safetensors (as a DeepSpeed file with
    `stage3_gather_16bit_weights_on_model_save: false` leaves it): the weights are merged from the ZeRO shards
    and compute what final/ computes (the checkpoint is the last step)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.commands.export import export

    ckpt = tmp_path / "copy" / "t" / "orpo" / "checkpoints" / "checkpoint-2"
    shutil.copytree(stage_dir / "checkpoints" / "checkpoint-2", ckpt)
    (ckpt / "model.safetensors").unlink()
    out = export(ckpt, tmp_path / "exported")
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("What is the capital of France?", return_tensors="pt")
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out)(**ids).logits
        live = AutoModelForCausalLM.from_pretrained(stage_dir / "final")(**ids).logits
    torch.testing.assert_close(exported, live, rtol=0, atol=1e-6)
