"""PPO under the deepspeed launcher on 2 CPU ranks: ZeRO-3 for all four models runs, saves, resumes, and
each rank holds about half the model-state elements it holds under ZeRO-0 (from <run>/ppo/memory.json);
`rlhf export` turns its last sharded checkpoint into the final model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch import cpu_rank_env, deepspeed_cli, ppo_config  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _setup(tmp_path: Path, policy: Path, reward: Path, zero_stage: int, steps: int) -> Path:
    return ppo_config(tmp_path, policy, reward, zero_stage=zero_stage, name=f"ppo_z{zero_stage}.yaml",
                      ppo={"steps": steps, "mini_batch_size": 2, "grad_accum": 2, "learning_rate": 1e-4,
                           "critic_learning_rate": 1e-4, "save_steps": 1, "sample_every": 1})


def _run(config: Path) -> None:
    proc = deepspeed_cli(["ppo", "--config", str(config)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _model_state(stage_dir: Path) -> tuple[int, dict]:
    report = json.loads((stage_dir / "memory.json").read_text())
    assert report["world_size"] == 2
    return report["total_model_state_numel"], report["roles"]


def _check_export(stage_dir: Path, tmp_path: Path) -> None:
    """`rlhf export` rebuilds the actor from the last checkpoint's ZeRO-3 shards (the final step, so the live
    model is final/): same logits. The critic comes out as a sequence classifier that loads as one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.export import export

    ckpt = stage_dir / "checkpoints" / "checkpoint-2"
    assert len(list((ckpt / "actor" / "state").glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one shard per rank
    cmd = [sys.executable, "-m", "rlhf.cli", "export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "actor")]
    proc = subprocess.run(cmd, env=cpu_rank_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export(ckpt, tmp_path / "critic", role="critic")
    for role in ("actor", "critic"):
        assert not [p.name for p in (tmp_path / role).iterdir() if p.suffix in (".pt", ".bin", ".pth")]
    tok = AutoTokenizer.from_pretrained(tmp_path / "actor")
    ids = tok("Question number 3? The answer is", return_tensors="pt")
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "actor")(**ids).logits
        live = AutoModelForCausalLM.from_pretrained(stage_dir / "final")(**ids).logits
        critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic")(**ids).logits
    torch.testing.assert_close(exported, live, rtol=0, atol=1e-6)
    assert critic.shape == (1, 1) and torch.isfinite(critic).all()


def test_zero3_two_steps_save_resume_and_half_the_memory(tmp_path, tiny_model_dir, tiny_reward_dir):
    z3 = tmp_path / "z3"
    _run(_setup(z3, tiny_model_dir, tiny_reward_dir, zero_stage=3, steps=1))
    _run(_setup(z3, tiny_model_dir, tiny_reward_dir, zero_stage=3, steps=2))  # resumes from checkpoint-1
    stage_dir = z3 / "runs" / "t" / "ppo"
    assert json.loads((stage_dir / "stage.json").read_text())["global_step"] == 2
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # sharded actor: rollout and update forwards still agree exactly
        assert abs(r["policy/ratio_first"] - 1.0) < 1e-6 and r["policy/log_ratio_first_absmax"] < 1e-6
    assert (stage_dir / "final" / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(stage_dir / "final")  # full (gathered) weights, loadable as-is
    _check_export(stage_dir, tmp_path)
    z3_total, z3_roles = _model_state(stage_dir)
    assert all(role["zero_stage"] == 3 for role in z3_roles.values())

    z0 = tmp_path / "z0"
    _run(_setup(z0, tiny_model_dir, tiny_reward_dir, zero_stage=0, steps=1))
    z0_total, z0_roles = _model_state(z0 / "runs" / "t" / "ppo")
    ratio = z3_total / z0_total
    print(f"model-state elements per rank: ZeRO-3 {z3_total}, ZeRO-0 {z0_total}, ratio {ratio:.3f}")
    assert ratio < 0.6
    for name in ("actor", "critic", "ref", "reward"):
        assert z3_roles[name]["params"] < 0.6 * z0_roles[name]["params"]
