"""Several srun tasks with no launcher (`srun --ntasks-per-node=8 python -m rlhf.cli ...`) stop in one line.

Each such task would see no RANK/LOCAL_RANK/WORLD_SIZE and start a run of its own, all racing for one stage
dir. Simulated with Slurm's variables: what srun sets in its tasks, what a batch script sees, and what the
one-task-per-node script `stages/slurm/stage.sbatch` passes on to the plain commands it runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import engine
from rlhf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NNODES", "NODE_RANK")


@pytest.fixture
def slurm(monkeypatch):
    """Set Slurm's variables (and any others) on a clean slate: none of Slurm's or a launcher's left."""
    for key in [k for k in os.environ if k.startswith("SLURM_")] + list(LAUNCH_VARS):
        monkeypatch.delenv(key, raising=False)

    def env(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, str(value))

    return env


def test_a_task_of_several_srun_tasks_without_a_launcher_is_refused(slurm):
    slurm(SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_LOCALID=1)  # one task per GPU, two on this node
    with pytest.raises(ConfigError) as refused:
        engine.launched()
    assert str(refused.value) == (
        "srun started this process as task 1 of 2 (SLURM_PROCID=1) with no launcher, so every task would run on "
        "its own, all racing for one stage dir: start one task per node with stages/slurm/stage.sbatch, which "
        "runs a launcher for the node's GPUs (stages/README.md)")


@pytest.mark.parametrize("env", [
    {"SLURM_STEP_NUM_TASKS": 8, "SLURM_NTASKS": 8, "SLURM_PROCID": 0, "SLURM_LOCALID": 0},  # srun's first task
    {"SLURM_NTASKS": 16, "SLURM_PROCID": 9, "SLURM_LOCALID": 1},  # an srun too old to set SLURM_STEP_*
    {"SLURM_STEP_NUM_TASKS": 2, "SLURM_NTASKS": 2, "SLURM_PROCID": 1, "SLURM_LOCALID": 0},  # one per node, bare
], ids=["first-task", "no-step-vars", "one-per-node-without-a-launcher"])
def test_every_task_is_refused(slurm, env):
    slurm(**env)
    with pytest.raises(ConfigError, match=r"^srun started this process as task \d+ of \d+ .*stage\.sbatch"):
        engine.launched()


@pytest.mark.parametrize("env, expected", [
    ({}, False),  # no Slurm
    ({"SLURM_NTASKS": 16, "SLURM_PROCID": 0, "SLURM_LOCALID": 0}, False),  # a batch script: one process
    ({"SLURM_STEP_NUM_TASKS": 1, "SLURM_NTASKS": 1, "SLURM_PROCID": 0}, False),  # srun -n1
    # stage.sbatch's task on node 1 running `rlhf preflight` before the launcher starts
    ({"SLURM_STEP_NUM_TASKS": 2, "SLURM_NTASKS": 2, "SLURM_PROCID": 1, "NNODES": 2, "NODE_RANK": 1}, False),
    # a rank that launcher started in that task
    ({"SLURM_STEP_NUM_TASKS": 2, "SLURM_PROCID": 1, "NNODES": 2, "LOCAL_RANK": 3, "RANK": 11, "WORLD_SIZE": 16},
     True),
    ({"SLURM_NTASKS": 2, "SLURM_PROCID": 1, "SLURM_LOCALID": 1, "LOCAL_RANK": 1}, True),  # torchrun in srun
], ids=["no-slurm", "batch-script", "one-task", "stage.sbatch-plain-command", "stage.sbatch-rank", "launcher"])
def test_one_process_per_run_is_not_refused(slurm, env, expected):
    slurm(**env)
    assert engine.launched() is expected


@pytest.mark.timeout(300)
def test_the_cli_stops_in_one_line_before_touching_the_run_dir(tmp_path, rlhf_cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    env.update({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "5001"})
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "sft", "--config", "configs/tiny.yaml", "--set",
                           f"run.output_dir={tmp_path / 'runs'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [line for line in proc.stderr.splitlines() if line.strip()][-1:], proc.stderr[-3000:]
    assert errors[0].startswith("error: srun started this process as task 1 of 2 (SLURM_PROCID=1)")
    assert not (tmp_path / "runs" / "tiny" / "sft").exists()
