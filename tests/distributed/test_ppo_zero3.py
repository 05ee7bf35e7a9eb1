"""PPO under the deepspeed launcher on 2 CPU ranks with ZeRO-3 for all four models. One run serves every test
here (a launch costs far more than a step): 3 fresh steps with the static decoder, watched from inside the
ranks by ppo_zero3_probe.py, which the first test resumes from checkpoint-3 to step 4 by the plain CLI with
HF generate (`ppo.generation` is a run-only key: a resume may change it).

- The run saves, resumes, and each rank holds about half the model-state elements it holds under ZeRO-0
  (from <run>/ppo/memory.json); `rlhf export` turns its last sharded checkpoint into the final model.
- PPO's models under ZeRO-3, the DeepSpeed way: every scored model's forward goes through the engine's
  top-level module, and every model is loaded already partitioned over the ranks. DeepSpeed starts each
  forward's parameter trace (and its prefetching from that trace) in a hook on the top-level module of an
  engine. The critic and the reward model are called through one `ScalarHead` module, so that hook runs once
  per forward, and the reward model's trace becomes complete. The static decoder's KV cache
  (`ppo.generation: static`) is released after every rollout under ZeRO-3. `build_models` loads each ZeRO-3
  role under DeepSpeed's zero.Init (`engine.partitioned_loading`), so every model reaches `engine.wrap`
  already partitioned. What that saves in host memory is measured by `bench/zero3_load_memory.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch import cpu_rank_env, deepspeed_cli, ppo_config  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
PROBE = Path(__file__).parent / "ppo_zero3_probe.py"


def _setup(tmp_path: Path, policy: Path, reward: Path, zero_stage: int, steps: int, **ppo) -> Path:
    """Micro-batches of 2; checkpoints at the last step only (the one a resume or an export reads); `ppo` adds
    settings."""
    return ppo_config(tmp_path, policy, reward, zero_stage=zero_stage, name=f"ppo_z{zero_stage}.yaml",
                      ppo={"steps": steps, "mini_batch_size": 4, "grad_accum": 2, "learning_rate": 1e-4,
                           "critic_learning_rate": 1e-4, "save_steps": 100, "sample_every": 1, **ppo})


def _run(config: Path, probe_out: Path | None = None) -> None:
    """`rlhf ppo` on 2 ranks; with `probe_out`, under ppo_zero3_probe.py, which writes <probe_out>/rank<r>.json."""
    if probe_out is None:
        proc = deepspeed_cli(["ppo", "--config", str(config)])
    else:
        probe_out.mkdir(parents=True, exist_ok=True)
        proc = deepspeed_cli([str(probe_out), "ppo", "--config", str(config)], script=PROBE, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, tiny_model_dir, tiny_reward_dir) -> tuple[Path, list[dict]]:
    """(<dir> of the ZeRO-3 run, each rank's probe report): 3 steps from scratch with the static decoder under
    the probe (the resume is the first test's own)."""
    z3 = tmp_path_factory.mktemp("z3")
    _run(_setup(z3, tiny_model_dir, tiny_reward_dir, zero_stage=3, steps=3, generation="static"), z3 / "probe")
    return z3, [json.loads((z3 / "probe" / f"rank{r}.json").read_text()) for r in range(2)]


def _model_state(stage_dir: Path) -> tuple[int, dict]:
    report = json.loads((stage_dir / "memory.json").read_text())
    assert report["world_size"] == 2
    return report["total_model_state_numel"], report["roles"]


def _check_export(stage_dir: Path, tmp_path: Path, step: int) -> None:
    """`rlhf export` rebuilds the actor from the last checkpoint's ZeRO-3 shards (the final step, so the live
    model is final/): same logits. The critic comes out as a sequence classifier that loads as one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.commands.export import export

    ckpt = stage_dir / "checkpoints" / f"checkpoint-{step}"
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


def test_zero3_steps_save_resume_and_half_the_memory(tmp_path, zero3_run, tiny_model_dir, tiny_reward_dir):
    z3, _ = zero3_run
    _run(_setup(z3, tiny_model_dir, tiny_reward_dir, zero_stage=3, steps=4))  # resumes from checkpoint-3
    stage_dir = z3 / "runs" / "t" / "ppo"
    assert json.loads((stage_dir / "stage.json").read_text())["global_step"] == 4
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:  # sharded actor: rollout and update forwards still agree exactly
        assert abs(r["policy/ratio_first"] - 1.0) < 1e-6 and r["policy/log_ratio_first_absmax"] < 1e-6
    assert (stage_dir / "final" / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(stage_dir / "final")  # full (gathered) weights, loadable as-is
    _check_export(stage_dir, tmp_path, step=4)
    z3_total, z3_roles = _model_state(stage_dir)  # written by the resumed run (1 step), as the ZeRO-0 run's
    assert all(role["zero_stage"] == 3 for role in z3_roles.values())

    z0 = tmp_path / "z0"
    _run(_setup(z0, tiny_model_dir, tiny_reward_dir, zero_stage=0, steps=1))
    z0_total, z0_roles = _model_state(z0 / "runs" / "t" / "ppo")
    ratio = z3_total / z0_total
    print(f"model-state elements per rank: ZeRO-3 {z3_total}, ZeRO-0 {z0_total}, ratio {ratio:.3f}")
    assert ratio < 0.6
    for name in ("actor", "critic", "ref", "reward"):
        assert z3_roles[name]["params"] < 0.6 * z0_roles[name]["params"]


def test_zero3_models_load_partitioned_and_are_scored_through_their_top_module(zero3_run):
    _, reports = zero3_run
    for report in reports:
        # every model was built partitioned (zero.Init), not whole and then sharded by DeepSpeed
        assert report["loaded_partitioned"] == {"actor": True, "critic": True, "ref": True, "reward": True}
        records = report["steps"]
        assert [r["step"] for r in records] == [2, 3]
        for r in records:
            # per step: 2 rollout chunks each for values and scores, and the update's second micro-batch for the
            # critic (its first reuses the rollout's forward)
            assert r["resets"]["critic"] >= 3 and r["resets"]["reward"] >= 2, r
            assert r["complete"]["reward"], r  # forward-only, the same modules each time: a complete trace
            # the static decoder's KV cache is freed after each rollout: a ZeRO-3 actor's weights move anyway
            assert not r["kv_cache_kept"], r
        assert any(r["complete"]["critic"] for r in records), records
