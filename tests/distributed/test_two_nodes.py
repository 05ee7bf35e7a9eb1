"""Two "nodes" on loopback, one CPU rank each, started the multi-node way: each node runs the same stage
script with NNODES=2, its own NODE_RANK and MASTER_ADDR=127.0.0.1, so stages/lib.sh launches
`deepspeed --no_ssh --num_nodes 2 --node_rank r --num_gpus 1`. Both nodes share one run dir (the
documented layout, stages/README.md "Filesystems"). The reward stage, then one PPO step, run with
ZeRO-3 for every model; the PPO memory report is then checked against `rlhf plan`'s estimate.

Launches are the slow part, so the module's `shared_run` fixture runs both stages in the shared run dir
once: the shared-dir test checks what they left there, and the node-local-disks test puts a copy on each
node's disk (each node's rank files only, as if each had trained there) and resumes both stages from it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf import artifacts, claims, ownerfile, plan, replicate
from rlhf.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from launch import cpu_rank_env, free_port  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, policy: Path) -> Path:
    """<tmp>/two.yaml for the run <tmp>/runs/two (the reward stage: 3 steps, a checkpoint each)."""
    cfg = {"run": {"name": "two", "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
           "model": {"name_or_path": str(policy)},
           "data": {"preference": str(ROOT / "data/tiny/preference.jsonl"), "eval_fraction": 0.1,
                    "max_length": 96, "max_prompt_length": 32},
           "sft": {"max_steps": 1},
           "reward": {"learning_rate": 1e-3, "max_steps": 3, "batch_size": 4, "save_steps": 1, "logging_steps": 1},
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
        # the stage script's own preflight (port, hosts, versions) is tested in tests/unit/test_stage_launch.py
        # and test_preflight.py; the stage checks itself again once started
        env = cpu_rank_env(NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           NUM_GPUS="1", PY=sys.executable, PREFLIGHT="0")
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


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, tiny_model_dir) -> Path:
    """<dir>/two.yaml for the run <dir>/runs/two: a finished SFT stage, then the reward stage (3 steps, a
    checkpoint each) and one PPO step (checkpoint-1) that the two nodes ran in that shared run dir. Tests
    that change the run copy it."""
    tmp = tmp_path_factory.mktemp("two_nodes_shared")
    config = _config(tmp, tiny_model_dir)
    run_dir = tmp / "runs" / "two"
    shutil.copytree(tiny_model_dir, run_dir / "sft" / "final")  # a finished SFT stage: reward and PPO start from it
    artifacts.write_manifest(run_dir / "sft", "sft", inputs={}, config_hash="test", metrics={})
    _two_nodes("02_reward.sh", config)
    _two_nodes("03_ppo.sh", config)
    return config


def _rank_of(name: str) -> int | None:
    """The rank that wrote a file each rank writes for itself (`replicate.PER_RANK`: ZeRO shards, random
    states), or None for a file of rank 0's that every node gets."""
    if not replicate.PER_RANK.fullmatch(name):
        return None
    return int(re.search(r"(?:pp_rank_|rng_state_|rng-)(\d+)", name).group(1))


def _received_as_written(ckpts: list[Path]) -> None:
    """Node 1's copy of a checkpoint (`ckpts[1]`) holds rank 0's files byte for byte and its own rank's
    files (shards, random states) next to them, but not rank 0's (each rank reads its own)."""
    files = [{p.relative_to(c).as_posix(): p for p in c.rglob("*") if p.is_file()} for c in ckpts]
    common = [{rel: p.read_bytes() for rel, p in f.items() if _rank_of(p.name) is None} for f in files]
    assert common[0] and common[1] == common[0], ckpts
    assert {_rank_of(p.name) for p in files[1].values()} == {None, 1}, ckpts


def _own_disks(shared: Path, dirs: list[Path]) -> None:
    """Copy the shared run dir to each node's `dirs[node]` as that node would hold it had the stages run on
    node-local disks: in checkpoints, its own rank's files only; on node 1, no final models."""
    for node, run_dir in enumerate(dirs):
        shutil.copytree(shared, run_dir, ignore=shutil.ignore_patterns("logs"))
        for path in [*(run_dir / "reward" / "checkpoints").rglob("*"), *(run_dir / "ppo" / "checkpoints").rglob("*")]:
            if _rank_of(path.name) not in (None, node):  # another node's rank wrote it, on its own disk
                path.unlink()
    for stage in ("reward", "ppo"):
        shutil.rmtree(dirs[1] / stage / "final")  # node 1 can have the final models only by receiving them


def test_reward_and_one_ppo_step_on_two_loopback_nodes(shared_run):
    """The reward stage and one PPO step on the shared run dir (run by the `shared_run` fixture)."""
    config = shared_run
    run_dir = config.parent / "runs" / "two"
    assert artifacts.is_complete(run_dir / "reward")
    assert (run_dir / "reward" / "final" / "model.safetensors").is_file()
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


def test_nodes_with_their_own_disks_each_get_every_artifact_and_resume(tmp_path, tiny_model_dir, shared_run):
    """No shared filesystem: each node keeps its run under its own root (node0/, node1/), as on node-local
    disks. Rank 0 writes; the other node receives copies of the final models, stage.json files and
    checkpoints over the process group; after losing their stage.json, the reward stage (HF Trainer)
    and PPO (own loop) each resume on both nodes.

    Each disk starts with the shared run's stages as if that node had trained them there: its own rank's
    files only (shards, random states) and, on node 1, no final models. A node-1 checkpoint then holds what
    node 1 receives of one (each resume below checks that it receives just that) plus what its rank wrote."""
    from safetensors.torch import load_file

    config = _config(tmp_path, tiny_model_dir)
    roots = [tmp_path / f"node{n}" for n in (0, 1)]
    dirs = [root / "runs" / "two" for root in roots]
    _own_disks(shared_run.parent / "runs" / "two", dirs)

    def own_disk(node: int) -> list[str]:
        return ["--set", f"run.output_dir={roots[node] / 'runs'}"]

    # A Trainer stage resumes on node-local disks too. Lose the reward manifest and last checkpoint on both
    # nodes: both resume from checkpoint-2, train step 3.
    for run_dir in dirs:
        shutil.rmtree(run_dir / "reward" / "checkpoints" / "checkpoint-3")
        assert artifacts.latest_checkpoint(run_dir / "reward" / "checkpoints").name == "checkpoint-2", run_dir
        (run_dir / "reward" / artifacts.MANIFEST).unlink()
    # Node 1's copy holds a claim whose process is gone: node 1's first rank takes it over, node 0 sees none.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (dirs[1] / "reward" / claims.CLAIM).write_text(json.dumps({"token": "gone", "host": "node1", "pid": gone.pid,
                                                               "machine": ownerfile.machine_id(), "started": 0}))
    _two_nodes("02_reward.sh", config, node_args=own_disk)
    for run_dir in dirs:
        assert json.loads((run_dir / "reward" / artifacts.MANIFEST).read_text())["global_step"] == 3, run_dir
        assert not (run_dir / "reward" / claims.CLAIM).exists(), run_dir  # each node claimed its copy, and released it
    # Node 1 received checkpoint-3 as it was saved: complete (marker included), rank 0's files as written;
    # it keeps its own rank's random state, and rank 0's, which it never reads, is not sent to it.
    reward_ckpts = [d / "reward" / "checkpoints" / "checkpoint-3" for d in dirs]
    assert artifacts.latest_checkpoint(dirs[1] / "reward" / "checkpoints") == reward_ckpts[1]
    assert (reward_ckpts[1] / "rng_state_1.pth").is_file() and not (reward_ckpts[1] / "rng_state_0.pth").exists()
    _received_as_written(reward_ckpts)
    log0 = (dirs[0] / "logs" / "reward.node0.log").read_text()
    assert f"reward: resuming from {dirs[0] / 'reward' / 'checkpoints' / 'checkpoint-2'} (step 2)" in log0
    log1 = (dirs[1] / "logs" / "reward.node1.log").read_text()
    assert f"taking over the claim of pid {gone.pid}" in log1 and "taking over" not in log0

    # Lose the PPO manifest on both nodes and allow one more step: the stage resumes from checkpoint-1.
    for run_dir in dirs:
        assert artifacts.latest_checkpoint(run_dir / "ppo" / "checkpoints").name == "checkpoint-1", run_dir
        (run_dir / "ppo" / artifacts.MANIFEST).unlink()
    _two_nodes("03_ppo.sh", config, node_args=lambda n: [*own_disk(n), "--set", "ppo.steps=2"])
    for stage in ("reward", "ppo"):
        for run_dir in dirs:
            assert artifacts.is_complete(run_dir / stage), run_dir
        a, b = (load_file(str(d / stage / "final" / "model.safetensors")) for d in dirs)
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), stage
        assert {p.name for p in (dirs[0] / stage / "final").iterdir()} == \
            {p.name for p in (dirs[1] / stage / "final").iterdir()}
    for run_dir in dirs:
        manifest = json.loads((run_dir / "ppo" / artifacts.MANIFEST).read_text())
        assert manifest["global_step"] == 2
    # Node 1's checkpoints are complete (marker included) and hold rank 0's files as well as its own shard
    # and random state, but not rank 0's shard and random state (each rank reads its own).
    ckpt = [artifacts.latest_checkpoint(d / "ppo" / "checkpoints") for d in dirs]
    assert ckpt[0] is not None and ckpt[1] is not None and ckpt[0].name == ckpt[1].name == "checkpoint-2"
    assert (ckpt[1] / "trainer_state.json").read_text() == (ckpt[0] / "trainer_state.json").read_text()
    assert (ckpt[1] / "rng-1.json").is_file() and not (ckpt[1] / "rng-0.json").exists()
    assert list(ckpt[1].rglob("zero_pp_rank_1_*")) and not list(ckpt[1].rglob("zero_pp_rank_0_*"))
    _received_as_written(ckpt)
    log0 = (dirs[0] / "logs" / "ppo.node0.log").read_text()
    assert f"ppo: resuming from {dirs[0] / 'ppo' / 'checkpoints' / 'checkpoint-1'} (step 1)" in log0
