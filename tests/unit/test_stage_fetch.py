"""What the stage scripts run before a launch, with stand-ins for every launch (nothing starts ranks): the
models fetched once per node before the launcher (`rlhf fetch`; in the hostfile mode through DeepSpeed's
runner, one process per host), and in the hostfile (pdsh) mode the stages to run decided once, on the launch
host, and sent to every host in each stage's one command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from test_stage_launch import _bash, _env, _hostfile  # tests/unit is on sys.path (pytest's rootdir import)


def _stand_in(tmp_path: Path, real: str = "") -> Path:
    """A Python that records each call (its arguments, one line) in `calls` and does nothing; calls whose
    first words match the `real` pattern (and `-c`: the script's process-group wrapper) run the real one."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    f'if [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\n'
                    f'echo "$*" >> {tmp_path / "calls"}\n'
                    + (f'case "$1 $2 $3" in {real}) exec {sys.executable} "$@" ;; esac\n' if real else "")
                    + "exit 0\n")
    fake.chmod(0o755)
    return fake


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls").read_text().splitlines()


@pytest.mark.parametrize("launch", [{}, {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "NUM_GPUS": "2"}],
                         ids=["plain", "nnodes"])
def test_stage_script_fetches_its_models_once_before_the_launcher(launch, tmp_path):
    env = _env(tmp_path, PY=str(_stand_in(tmp_path)), LOG_DIR=str(tmp_path / "logs"), **launch)
    proc = _bash(["stages/02_reward.sh", "configs/tiny.yaml", "--set", "x=1", "--restart"], env)
    assert proc.returncode == 0, proc.stderr
    preflight, fetched, started = _calls(tmp_path)
    assert preflight == "-m rlhf.cli preflight --stage reward --config configs/tiny.yaml --set x=1"
    assert fetched == "-m rlhf.cli fetch --config configs/tiny.yaml --set x=1 --stages reward"  # not --restart
    assert started.endswith("--module rlhf.cli reward --config configs/tiny.yaml --set x=1 --restart"
                            if launch else "-m rlhf.cli reward --config configs/tiny.yaml --set x=1 --restart")
    skipped = _bash(["stages/02_reward.sh", "configs/tiny.yaml"], {**env, "PREFLIGHT": "0"})
    [again] = _calls(tmp_path)[3:]  # the launch alone
    assert skipped.returncode == 0 and "rlhf.cli reward --config" in again


def _sft_complete(out_dir: Path) -> None:
    (out_dir / "tiny" / "sft").mkdir(parents=True)
    (out_dir / "tiny" / "sft" / "stage.json").write_text(json.dumps({"stage": "sft"}))


def test_hostfile_pipeline_decides_the_stages_once_and_sends_them_to_every_host(tmp_path):
    """The launch host's run dir holds sft complete. `rlhf pipeline --pending` (the real one) runs once, on
    this host; the models are fetched once through DeepSpeed's runner (every host of the file, one process
    each) before the first stage; each pending stage is one runner launch, which pdsh sends to every host;
    the complete stage is launched nowhere. The first host of the file is not this one: a note says so."""
    out_dir = tmp_path / "runs"
    _sft_complete(out_dir)
    hosts = _hostfile(tmp_path)  # hostA, hostB
    env = _env(tmp_path, PY=str(_stand_in(tmp_path, real="'-m rlhf.cli pipeline'")), HOSTFILE=str(hosts),
               MASTER_ADDR="10.0.0.1", NUM_GPUS="4", LOG_DIR=str(tmp_path / "logs"))
    args = ["configs/tiny.yaml", "--set", f"run.output_dir={out_dir}"]
    proc = _bash(["stages/pipeline.sh", *args], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tail = f"--config configs/tiny.yaml --set run.output_dir={out_dir}"
    runner = f"-m deepspeed.launcher.runner --hostfile {hosts} --master_addr 10.0.0.1 --master_port 29500"
    assert _calls(tmp_path) == [
        f"-m rlhf.cli preflight {tail}",
        f"-m rlhf.cli pipeline {tail} --stages",
        f"-m rlhf.cli pipeline {tail} --pending",
        f"{runner} --num_gpus 1 --module rlhf.cli fetch {tail} --stages reward ppo",
        f"{runner} --num_gpus 4 --module rlhf.cli reward {tail}",
        f"{runner} --num_gpus 4 --module rlhf.cli ppo {tail}",
    ]
    assert "[pipeline] stages to run on every node: reward ppo" in proc.stdout.splitlines()
    assert "[pipeline] sft: complete, skipping" in proc.stdout
    assert "global rank 0 writes on hostA (HOSTFILE's first host)" in proc.stderr
    assert not list((tmp_path / "tmp").iterdir())  # the launches' environment files are gone


def test_hostfile_pipeline_dry_run_shows_one_stage_list_for_every_host(tmp_path):
    """DRY_RUN, started on the file's first host (localhost): no note; the fetch through the runner, then
    per pending stage the one command pdsh sends each host, the same stage on both."""
    out_dir = tmp_path / "runs"
    _sft_complete(out_dir)
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\nhostB slots=2\n")
    env = _env(tmp_path, PY=str(_stand_in(tmp_path, real="'-m rlhf.cli pipeline'")), HOSTFILE=str(hosts),
               MASTER_ADDR="10.0.0.1", DRY_RUN="1")
    proc = _bash(["stages/pipeline.sh", "configs/tiny.yaml", "--set", f"run.output_dir={out_dir}"], env)
    assert proc.returncode == 0, proc.stderr
    assert "note:" not in proc.stderr and not out_dir.joinpath("tiny", "reward").exists()
    lines = proc.stdout.splitlines()
    fetched = lines.index("[pipeline] stages to run on every node: reward ppo") + 1
    assert lines[fetched].startswith(f"[dry-run] fetch (every host of {hosts}): env DS_ENV_FILE=")
    assert "--num_gpus 1 --module rlhf.cli fetch --config configs/tiny.yaml" in lines[fetched]
    pdsh = [line for line in lines if "through pdsh" in line]
    assert [(line.split(",")[0], line.split("--module rlhf.cli ")[1].split()[0]) for line in pdsh] == [
        ("[dry-run] node 0 (host localhost", "reward"), ("[dry-run] node 1 (host hostB", "reward"),
        ("[dry-run] node 0 (host localhost", "ppo"), ("[dry-run] node 1 (host hostB", "ppo")]
    assert os.listdir(tmp_path / "tmp") == []
