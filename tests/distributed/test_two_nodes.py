"""Two "nodes" on loopback, one CPU rank each, started the multi-node way: each node runs the same stage
script with NNODES=2, its own NODE_RANK and MASTER_ADDR=127.0.0.1, so stages/lib.sh launches
`deepspeed --no_ssh --num_nodes 2 --node_rank r --num_gpus 1`. Both nodes share one run dir (the
documented layout, stages/README.md "Filesystems"). The reward stage, then one PPO step, run with
ZeRO-3 for every model; the PPO memory report is then checked against `rlhf plan`'s estimate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf import artifacts, claims, plan
from rlhf.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from launch import cpu_rank_env, free_port  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, policy: Path) -> Path:
    run_dir = tmp_path / "runs" / "two"
    shutil.copytree(policy, run_dir / "sft" / "final")  # a finished SFT stage: reward and PPO start from it
    artifacts.write_manifest(run_dir / "sft", "sft", inputs={}, config_hash="test", metrics={})
    cfg = {"run": {"name": "two", "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
           "model": {"name_or_path": str(policy)},
           "data": {"preference": str(ROOT / "data/tiny/preference.jsonl"), "eval_fraction": 0.1,
                    "max_length": 96, "max_prompt_length": 32},
           "sft": {"max_steps": 1},
           "reward": {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 4, "save_steps": 1, "logging_steps": 1},
           "final_stage": "ppo",
           "ppo": {"steps": 1, "rollout_batch_size": 4, "mini_batch_size": 2, "grad_accum": 1, "ppo_epochs": 1,
                   "learning_rate": 1e-4, "critic_learning_rate": 1e-4, "max_new_tokens": 8, "save_steps": 1,
                   "sample_every": 1},
           "deepspeed": {"enabled": True, "zero_stage": 3},
           "logging": {"progress": False, "tensorboard": False, "plots": False}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _two_nodes(script: str, config: Path, timeout: int = 240, node_args=None) -> None:
    """Start the stage script as node 0 and node 1 at once; both must exit 0. `node_args(node)` gives
    extra arguments per node."""
    port = free_port()
    procs = []
    for node in (0, 1):
        env = cpu_rank_env(NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           NUM_GPUS="1", PY=sys.executable)
        extra = node_args(node) if node_args else []
        procs.append(subprocess.Popen(["bash", str(ROOT / "stages" / script), str(config), *extra], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for node, (proc, out) in enumerate(zip(procs, outs, strict=True)):
        assert proc.returncode == 0, f"node {node} of {script} failed:\n{out[-4000:]}"
        assert "--no_ssh" in out or "node_rank" in out or proc.returncode == 0


def test_reward_and_one_ppo_step_on_two_loopback_nodes(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "runs" / "two"
    _two_nodes("02_reward.sh", config)
    assert artifacts.is_complete(run_dir / "reward")
    assert (run_dir / "reward" / "final" / "model.safetensors").is_file()
    _two_nodes("03_ppo.sh", config)
    manifest = json.loads((run_dir / "ppo" / "stage.json").read_text())
    assert manifest["global_step"] == 1
    for stage in ("reward", "ppo"):  # one log per node in the run dir
        for node in (0, 1):
            assert (run_dir / "logs" / f"{stage}.node{node}.log").is_file()
    # both nodes saw the shared run dir: the probe that found it is gone, and nothing was copied
    assert not list(run_dir.glob(".rlhf-shared-*"))
    assert not any("replicated" in (run_dir / "logs" / f"{stage}.node1.log").read_text() for stage in ("reward", "ppo"))

    # Estimate vs measurement: model-state elements per rank (parameters this rank holds, ZeRO-3 shards,
    # plus Adam m and v of the trained models), as counted by <run>/ppo/memory.json on rank 0.
    report = json.loads((run_dir / "ppo" / "memory.json").read_text())
    assert report["world_size"] == 2
    assert all(role["zero_stage"] == 3 for role in report["roles"].values())
    est = plan.estimate(load_config(config), gpus=1, nodes=2)
    by_role = {m.role: m for m in est.models}
    estimated = sum(m.local_param_numel + m.local_optim_numel for m in est.models)
    measured = report["total_model_state_numel"]
    print(f"model-state elements per rank: plan {estimated:.0f}, measured {measured}, "
          f"ratio {estimated / measured:.3f}")
    assert abs(estimated - measured) <= 0.25 * measured
    for name, role in report["roles"].items():
        mine = by_role[name].local_param_numel + by_role[name].local_optim_numel
        assert abs(mine - (role["params"] + role["optimizer_state"])) <= 0.25 * mine, name


def test_nodes_with_their_own_disks_each_get_every_artifact_and_resume(tmp_path, tiny_model_dir):
    """No shared filesystem: each node keeps its run under its own root (node0/, node1/), as on node-local
    disks. Rank 0 writes; the other node receives copies of the final models, stage.json files and
    checkpoints over the process group; after losing their stage.json, the reward stage (HF Trainer)
    and PPO (own loop) each resume on both nodes."""
    from safetensors.torch import load_file

    config = _config(tmp_path, tiny_model_dir)
    roots = [tmp_path / f"node{n}" for n in (0, 1)]
    for root in roots:
        shutil.copytree(tmp_path / "runs", root / "runs")  # the finished SFT stage, on each disk
    shutil.rmtree(tmp_path / "runs")

    def own_disk(node: int) -> list[str]:
        return ["--set", f"run.output_dir={roots[node] / 'runs'}"]

    dirs = [root / "runs" / "two" for root in roots]

    def three_steps(node: int) -> list[str]:
        return [*own_disk(node), "--set", "reward.max_steps=3"]

    _two_nodes("02_reward.sh", config, node_args=three_steps)
    # A Trainer stage resumes on node-local disks too: node 1 received each checkpoint as it was saved.
    # Lose the reward manifest and last checkpoint on both nodes: both resume from checkpoint-2, train step 3.
    # Node 1 keeps its own rank's random state; rank 0's, which it never reads, is not sent to it.
    reward_ckpt = dirs[1] / "reward" / "checkpoints" / "checkpoint-2"
    assert (reward_ckpt / "rng_state_1.pth").is_file() and not (reward_ckpt / "rng_state_0.pth").exists()
    for run_dir in dirs:
        shutil.rmtree(run_dir / "reward" / "checkpoints" / "checkpoint-3")
        assert artifacts.latest_checkpoint(run_dir / "reward" / "checkpoints").name == "checkpoint-2", run_dir
        (run_dir / "reward" / artifacts.MANIFEST).unlink()
        assert not (run_dir / "reward" / claims.CLAIM).exists(), run_dir  # each node claimed its copy, and released it
    # Node 1's copy holds a claim whose process is gone: node 1's first rank takes it over, node 0 sees none.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (dirs[1] / "reward" / claims.CLAIM).write_text(json.dumps({"token": "gone", "host": "node1", "pid": gone.pid,
                                                               "machine": claims._machine(), "started": 0}))
    _two_nodes("02_reward.sh", config, node_args=three_steps)
    for run_dir in dirs:
        assert json.loads((run_dir / "reward" / artifacts.MANIFEST).read_text())["global_step"] == 3, run_dir
    log0 = (dirs[0] / "logs" / "reward.node0.log").read_text()
    assert f"reward: resuming from {dirs[0] / 'reward' / 'checkpoints' / 'checkpoint-2'} (step 2)" in log0
    log1 = (dirs[1] / "logs" / "reward.node1.log").read_text()
    assert f"taking over the claim of pid {gone.pid}" in log1 and "taking over" not in log0
    _two_nodes("03_ppo.sh", config, node_args=own_disk)
    for stage in ("reward", "ppo"):
        for run_dir in dirs:
            assert artifacts.is_complete(run_dir / stage), run_dir
        a, b = (load_file(str(d / stage / "final" / "model.safetensors")) for d in dirs)
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), stage
        assert {p.name for p in (dirs[0] / stage / "final").iterdir()} == \
            {p.name for p in (dirs[1] / stage / "final").iterdir()}
    # Node 1's checkpoints are complete (marker included) and hold rank 0's files as well as its own shard
    # and random state, but not rank 0's shard and random state (each rank reads its own).
    ckpt = [artifacts.latest_checkpoint(d / "ppo" / "checkpoints") for d in dirs]
    assert ckpt[0] is not None and ckpt[1] is not None and ckpt[0].name == ckpt[1].name == "checkpoint-1"
    assert (ckpt[1] / "trainer_state.json").read_text() == (ckpt[0] / "trainer_state.json").read_text()
    assert (ckpt[1] / "rng-1.json").is_file() and not (ckpt[1] / "rng-0.json").exists()
    assert list(ckpt[1].rglob("zero_pp_rank_1_*")) and not list(ckpt[1].rglob("zero_pp_rank_0_*"))

    # Lose the PPO manifest on both nodes and allow one more step: the stage resumes from checkpoint-1.
    for run_dir in dirs:
        (run_dir / "ppo" / artifacts.MANIFEST).unlink()
    _two_nodes("03_ppo.sh", config, node_args=lambda n: [*own_disk(n), "--set", "ppo.steps=2"])
    for run_dir in dirs:
        manifest = json.loads((run_dir / "ppo" / artifacts.MANIFEST).read_text())
        assert manifest["global_step"] == 2
        assert artifacts.latest_checkpoint(run_dir / "ppo" / "checkpoints").name == "checkpoint-2"
    log0 = (dirs[0] / "logs" / "ppo.node0.log").read_text()
    assert f"ppo: resuming from {dirs[0] / 'ppo' / 'checkpoints' / 'checkpoint-1'} (step 1)" in log0
