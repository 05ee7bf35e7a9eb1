"""PPO on 2 CPU ranks in the layouts users pick for large models, and without DeepSpeed:

- ZeRO-2 with the optimizer offloaded (actor) and ZeRO-3 with parameters and optimizer offloaded (critic,
  reference): DeepSpeed refuses a client optimizer with offload, so it builds the optimizer from the
  config; two steps run, save, and a second launch resumes from the checkpoint; `rlhf export` rebuilds
  the actor and the critic from those shards.
- DeepSpeed off under a launcher: plain engines average gradients over ranks and start from rank 0's
  weights, so both ranks end with the same actor and critic although each rank sampled other prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from launch import deepspeed_cli, ppo_config  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
HERE = Path(__file__).parent
PPO = {"mini_batch_size": 2, "grad_accum": 2, "learning_rate": 1e-3, "critic_learning_rate": 1e-3,
       "save_steps": 1, "sample_every": 1}


def _with_deepspeed(config: Path, deepspeed: dict) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw["deepspeed"].update(deepspeed)
    config.write_text(yaml.safe_dump(raw))
    return config


def test_offloaded_optimizer_and_parameters_train_save_and_resume(tmp_path, tiny_model_dir, tiny_reward_dir):
    offload = {"actor": {"zero_stage": 2, "offload_optimizer": True},
               "critic": {"zero_stage": 3, "offload_param": True, "offload_optimizer": True},
               "ref": {"zero_stage": 3, "offload_param": True}}
    for steps in (1, 2):  # the second launch resumes from checkpoint-1
        config = _with_deepspeed(ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, zero_stage=0,
                                            ppo={**PPO, "steps": steps}), offload)
        proc = deepspeed_cli(["ppo", "--config", str(config)])
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from" in proc.stderr + proc.stdout
    stage_dir = tmp_path / "runs" / "t" / "ppo"
    manifest = json.loads((stage_dir / "stage.json").read_text())
    assert manifest["global_step"] == 2
    assert manifest["devices"] == {"actor": "cpu", "critic": "cpu", "ref": "cpu", "reward": "cpu"}
    roles = json.loads((stage_dir / "memory.json").read_text())["roles"]
    assert roles["actor"]["zero_stage"] == 2 and roles["critic"]["zero_stage"] == 3
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(abs(r["policy/ratio_first"] - 1.0) < 1e-6 for r in records)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(stage_dir / "final")
    _check_export(stage_dir, tmp_path)


def _check_export(stage_dir: Path, tmp_path: Path) -> None:
    """`rlhf export` of the last checkpoint: the actor from ZeRO-2 shards with an offloaded optimizer (the
    final step: final/'s logits), the critic from ZeRO-3 shards with offloaded parameters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.commands.export import export

    ckpt = stage_dir / "checkpoints" / "checkpoint-2"
    actor, critic = (export(ckpt, tmp_path / role, role=role) for role in ("actor", "critic"))
    ids = AutoTokenizer.from_pretrained(actor)("Question number 5?", return_tensors="pt")
    with torch.no_grad():
        live = AutoModelForCausalLM.from_pretrained(stage_dir / "final")(**ids).logits
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(actor)(**ids).logits, live, rtol=0, atol=1e-6)
        assert torch.isfinite(AutoModelForSequenceClassification.from_pretrained(critic)(**ids).logits).all()


def test_without_deepspeed_the_ranks_stay_one_model(tmp_path, tiny_model_dir, tiny_reward_dir):
    # the critic starts from the SFT model with a new, randomly initialised value head: seeded per rank,
    # so it differs until the ranks agree on rank 0's
    config = ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, zero_stage=0,
                        ppo={**PPO, "steps": 2, "critic_init": "sft"})
    config = _with_deepspeed(config, {"enabled": False})
    digests = tmp_path / "digests"
    proc = deepspeed_cli(["ppo", "--config", str(config)], script=HERE / "rank_digest_cli.py",
                         env={"RLHF_DIGEST_DIR": str(digests)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((digests / f"rank-{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["step"] == ranks[1]["step"] == 2
    assert ranks[0]["actor"] == ranks[1]["actor"], "the actors drifted apart"
    assert ranks[0]["critic"] == ranks[1]["critic"], "the critics drifted apart"
