"""How stages/lib.sh starts a launch, checked without one: DRY_RUN output per mode and node, the variables a
multi-node launch refuses to guess, NUM_GPUS from the machine, the hostfile mode's master address and the
environment it forwards (DeepSpeed's real runner with stand-ins for ssh and pdsh), and pipeline.sh's one
decision on the stages to run when two nodes see different run dirs (stand-in launches)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLEARED = ("NUM_GPUS", "NNODES", "NODE_RANK", "HOSTFILE", "LAUNCHER", "MASTER_ADDR", "MASTER_PORT", "NET_IFNAME",
           "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "DRY_RUN", "DS_ENV_FILE", "LOG_DIR", "OMP_NUM_THREADS",
           "LAUNCH_ARGS")


def _env(tmp_path: Path, gpus: int | None = None, **extra: str) -> dict[str, str]:
    """A clean launch environment: HOME and TMPDIR under tmp_path, and an nvidia-smi that lists `gpus` GPUs
    (None: one that fails, as on a machine without a driver)."""
    bin_dir, tmp = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    smi = "exit 9" if gpus is None else "".join(f"echo 'GPU {i}: H100 (UUID: GPU-{i})'\n" for i in range(gpus))
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{smi}\necho '  MIG 1g.10gb Device 0: (UUID: MIG-0)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "HOME": str(tmp_path), "TMPDIR": str(tmp), "PY": "py",
            **extra}


def _bash(cmd: str | list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    args = ["bash", "-c", cmd] if isinstance(cmd, str) else ["bash", *cmd]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _launch(env: dict[str, str]) -> subprocess.CompletedProcess:
    return _bash('source stages/lib.sh && rlhf_launcher && printf "%s\\n" "${LAUNCH[@]}"', env)


def _hostfile(tmp_path: Path) -> Path:
    path = tmp_path / "hosts"
    path.write_text("hostA slots=8  # the first host\n\nhostB slots=8\n")
    return path


# ------------------------------------------------------------------------------------------------- DRY_RUN

@pytest.mark.parametrize(("launch", "before"), [
    ({"NUM_GPUS": "2"}, "--master_port 29500 --include localhost:1 --enable_each_rank_log /l --module rlhf.cli"),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h"}, "--num_gpus 1 --include localhost:1 "
     "--enable_each_rank_log /l --module rlhf.cli"),
    ({"LAUNCHER": "torchrun"}, "SIGUSR1 --include localhost:1 --enable_each_rank_log /l -m rlhf.cli"),
])
def test_launch_args_go_to_the_launcher(launch, before, tmp_path):
    proc = _launch(_env(tmp_path, 1, LAUNCH_ARGS="--include localhost:1 --enable_each_rank_log /l", **launch))
    assert proc.returncode == 0, proc.stderr
    assert before in " ".join(proc.stdout.split())


def test_launch_args_without_a_launcher_are_refused(tmp_path):
    proc = _launch(_env(tmp_path, LAUNCH_ARGS="--bind_cores_to_rank"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: LAUNCH_ARGS=--bind_cores_to_rank needs a launcher (NUM_GPUS, NNODES, "
                                   "HOSTFILE or LAUNCHER=torchrun)")


@pytest.mark.parametrize("mode", ["plain", "num_gpus", "nnodes", "torchrun", "hostfile"])
def test_dry_run_prints_each_nodes_command_and_starts_nothing(mode, tmp_path):
    """PY=py does not exist: a launch would fail. The run dir, the log dir and TMPDIR stay empty."""
    out_dir = tmp_path / "runs"
    args = ["configs/tiny.yaml", "--set", f"run.output_dir={out_dir}"]
    tail = f"rlhf.cli {{}} --config configs/tiny.yaml --set run.output_dir={out_dir}"
    launch = {"plain": {}, "num_gpus": {"NUM_GPUS": "2"},
              "nnodes": {"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "NET_IFNAME": "eth1",
                         "NUM_GPUS": "4"},
              "torchrun": {"LAUNCHER": "torchrun", "NNODES": "2", "MASTER_ADDR": "h", "NUM_GPUS": "2"},
              "hostfile": {"HOSTFILE": str(_hostfile(tmp_path)), "MASTER_ADDR": "10.0.0.1"}}[mode]
    script, stage = {"plain": ("01_sft.sh", "sft"), "num_gpus": ("02_reward.sh", "reward"),
                     "nnodes": ("03_ppo.sh", "ppo"), "torchrun": ("03_dpo.sh", "dpo"),
                     "hostfile": ("03_orpo.sh", "orpo")}[mode]
    proc = _bash([f"stages/{script}", *args], _env(tmp_path, DRY_RUN="1", **launch))
    assert proc.returncode == 0, proc.stderr
    preflight, fetched, *lines = proc.stdout.splitlines()
    assert preflight == f"[dry-run] preflight: py -m rlhf.cli preflight --stage {stage} " \
        f"--config configs/tiny.yaml --set run.output_dir={out_dir}"
    assert fetched.startswith("[dry-run] fetch (") and fetched.endswith(f"fetch --config configs/tiny.yaml "
                                                                        f"--set run.output_dir={out_dir} --stages {stage}")
    assert all(line.startswith("[dry-run] ") for line in lines), lines
    tail = tail.format(stage)
    if mode == "plain":
        assert len(lines) == 1 and lines[0].endswith(f" py -m {tail}")
    elif mode == "num_gpus":
        assert len(lines) == 1 and "NUM_GPUS=2 " in lines[0]
        assert lines[0].endswith(f"py -m deepspeed.launcher.runner --num_gpus 2 --master_port 29500 --module {tail}")
    elif mode == "nnodes":
        for node in (0, 1):
            line = lines[node]
            assert line.startswith(f"[dry-run] node {node} of 2: ") and line.endswith(tail)
            for part in ("MASTER_ADDR=10.0.0.1 MASTER_PORT=1234 NNODES=2", f"NODE_RANK={node} NUM_GPUS=4",
                         "GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=eth1", "deepspeed.launcher.runner --no_ssh",
                         f"--node_rank {node} --master_addr 10.0.0.1 --master_port 1234 --num_gpus 4"):
                assert part in line, (part, line)
        assert "(written at launch): node0 slots=4 node1 slots=4" in lines[2]
    elif mode == "torchrun":
        for node in (0, 1):
            assert lines[node].startswith(f"[dry-run] node {node} of 2: MASTER_ADDR=h NNODES=2 NODE_RANK={node}")
            assert (f"torch.distributed.run --nproc_per_node 2 --nnodes 2 --node_rank {node} --master_addr h"
                    in lines[node])
        assert len(lines) == 2
    else:  # this host starts the runner; pdsh starts DeepSpeed's launch on each host of the file
        assert lines[0].startswith("[dry-run] this node: MASTER_ADDR=10.0.0.1 ")
        assert "--master_addr 10.0.0.1 --master_port 29500 --module " + tail in lines[0]
        assert "env DS_ENV_FILE=" in lines[0] and "(written at launch): " in lines[1]
        for node, host in enumerate(("hostA", "hostB")):
            line = lines[2 + node]
            assert line.startswith(f"[dry-run] node {node} (host {host}, through pdsh): ")
            assert f"--node_rank={node} --master_addr=10.0.0.1 --master_port=29500 --module {tail}" in line
        assert len(lines) == 4
    assert not out_dir.exists() and not list((tmp_path / "tmp").iterdir())


def test_pipeline_dry_run_shows_every_stage_once_per_node_and_starts_nothing(tmp_path):
    """Real `rlhf pipeline --stages/--pending`; any other Python call (preflight, a launch) fails the test."""
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1 $2 $3" = "-m rlhf.cli pipeline" ]; then exec {sys.executable} "$@"; fi\n'
                    f'echo "started: $*" >&2; exit 7\n')
    fake.chmod(0o755)
    out_dir = tmp_path / "runs"
    env = _env(tmp_path, PY=str(fake), DRY_RUN="1", NNODES="2", MASTER_ADDR="10.0.0.1", NUM_GPUS="1")
    proc = _bash(["stages/pipeline.sh", "configs/tiny.yaml", "--set", f"run.output_dir={out_dir}"], env)
    assert proc.returncode == 0 and "started:" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("[dry-run] preflight: ") and "rlhf.cli preflight --config" in lines[0]
    for stage in ("sft", "reward", "ppo"):
        assert f"[pipeline] {stage}: starting" in lines
        for node in (0, 1):
            assert sum(line.startswith(f"[dry-run] node {node} of 2: ") and f"rlhf.cli {stage} " in line
                       for line in lines) == 1
    assert "pending on this node: sft reward ppo" in proc.stderr and "10.0.0.1:29500" in proc.stderr
    assert not out_dir.exists()


# ------------------------------------------------------------------------------ multi-node launch variables

@pytest.mark.parametrize(("given", "missing"), [
    ({"LAUNCHER": "torchrun", "NNODES": "2"}, ["NODE_RANK", "MASTER_ADDR"]),
    ({"LAUNCHER": "torchrun", "NNODES": "2", "NODE_RANK": "1"}, ["MASTER_ADDR"]),
    ({"LAUNCHER": "torchrun", "NNODES": "2", "MASTER_ADDR": "h"}, ["NODE_RANK"]),
    ({"NNODES": "2", "MASTER_ADDR": "h"}, ["NODE_RANK"]),
    ({"HOSTFILE": "hosts"}, ["MASTER_ADDR"]),
])
def test_multi_node_launch_refuses_to_guess_rank_or_master(given, missing, tmp_path):
    proc = _launch(_env(tmp_path, NUM_GPUS="1", **given))
    assert proc.returncode == 2 and proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: ") and all(f"{var} (" in line for var in missing), line
    assert all(f"{var} (" not in line for var in {"NODE_RANK", "MASTER_ADDR"} - set(missing)), line


def test_single_node_torchrun_keeps_its_local_defaults(tmp_path):
    proc = _launch(_env(tmp_path, LAUNCHER="torchrun", NUM_GPUS="2"))
    cmd = proc.stdout.split()
    assert proc.returncode == 0 and cmd[cmd.index("--node_rank") + 1] == "0"
    assert cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"


@pytest.mark.parametrize(("gpus", "expected"), [(2, "2"), (0, "1"), (None, "1")])
@pytest.mark.parametrize("mode", ["nnodes", "torchrun"])
def test_num_gpus_defaults_to_the_gpus_of_the_node(mode, gpus, expected, tmp_path):
    """nvidia-smi -L lists the GPUs (MIG lines below a GPU are not GPUs); none listed or no driver: 1."""
    launch = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h"}
    if mode == "torchrun":
        launch["LAUNCHER"] = "torchrun"
    proc = _launch(_env(tmp_path, gpus, **launch))
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[cmd.index("--num_gpus" if mode == "nnodes" else "--nproc_per_node") + 1] == expected
    assert f"[launch] NUM_GPUS unset: {expected} rank(s) per node" in proc.stderr
    if mode == "nnodes":
        hostfile = Path(cmd[cmd.index("--hostfile") + 1])
        assert hostfile.read_text().splitlines() == [f"node0 slots={expected}", f"node1 slots={expected}"]


# ------------------------------------------------------------------------------------------ hostfile mode

STAND_INS = {
    # DeepSpeed's runner checks passwordless ssh, and without --master_addr asks the first host for `hostname -I`
    "ssh": '#!/bin/sh\necho "ssh $*" >> "$CALLS"\necho "172.17.0.1 10.0.0.1"\n',
    # pdsh: record the command DeepSpeed sends to every host
    "pdsh": '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$CALLS.pdsh"\n',
}


def test_hostfile_mode_passes_master_addr_and_forwards_the_runs_environment(tmp_path):
    """The stage script runs DeepSpeed's own runner (stand-in ssh and pdsh): the command pdsh sends every host
    names MASTER_ADDR and exports what the ranks need, and a user's ~/.deepspeed_env is kept (its lines win)
    and left as it was; the per-launch file is gone afterwards."""
    env = _env(tmp_path, PY=sys.executable, HOSTFILE=str(_hostfile(tmp_path)), MASTER_ADDR="10.0.0.1",
               MASTER_PORT="23456", NUM_GPUS="1", LOG_DIR=str(tmp_path / "logs"), CALLS=str(tmp_path / "calls"),
               HF_HUB_OFFLINE="1", HF_HOME="/data/hf", HF_TOKEN="hf_secret", TORCH_NCCL_ASYNC_ERROR_HANDLING="1",
               NET_IFNAME="eth1", RLHF_JOB_ID="77", CUDA_HOME="/usr/local/cuda", OMP_NUM_THREADS="4",
               PREFLIGHT="0")  # hostA and hostB resolve nowhere: preflight would stop the launch (as it should)
    for name, body in STAND_INS.items():
        (tmp_path / "bin" / name).write_text(body)
        (tmp_path / "bin" / name).chmod(0o755)
    user_file = tmp_path / ".deepspeed_env"
    user_file.write_text("HF_HOME=/theirs\nMY_VAR=1\n")
    proc = _bash(["stages/01_sft.sh", "configs/tiny.yaml"], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sent = (tmp_path / "calls.pdsh").read_text().splitlines()
    assert sent[sent.index("-w") + 1] == "hostA,hostB"
    assert "--master_addr=10.0.0.1" in sent and "--master_port=23456" in sent
    assert "hostname -I" not in (tmp_path / "calls").read_text()  # nothing guessed
    exports = sent[sent.index("-w") + 2]
    for var in ("HF_HUB_OFFLINE=1", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "GLOO_SOCKET_IFNAME=eth1",
                "NCCL_SOCKET_IFNAME=eth1", "RLHF_JOB_ID=77", "CUDA_HOME=/usr/local/cuda", "OMP_NUM_THREADS=4",
                "HF_HOME=/theirs", "MY_VAR=1"):
        assert f"export {var};" in exports, (var, exports)
    assert "hf_secret" not in exports and "HF_HOME=/data/hf" not in exports
    assert f"PYTHONPATH={ROOT}" in exports  # DeepSpeed forwards PYTHON* itself, with the checkout first
    assert user_file.read_text() == "HF_HOME=/theirs\nMY_VAR=1\n"
    assert not list((tmp_path / "tmp").iterdir())


# --------------------------------------------------------------------------- pipeline.sh: one stage list

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("complete", [
    ({"sft", "reward"}, {"sft"}),  # node 1 lost reward's stage.json (a kill before its copy arrived)
    (set(), {"sft", "reward", "ppo"}),  # node 0 is new to the run, node 1 holds it all
    ({"sft", "reward", "ppo"}, {"sft", "reward", "ppo"}),
], ids=["kill_before_copy", "new_node", "all_done"])
def test_pipeline_nodes_with_different_run_dirs_run_the_same_stages(complete, tmp_path):
    """Two nodes (NNODES=2 on loopback), each with its own run dir. The launch is a stand-in that records the
    stage; preflight is a stand-in too. Every node runs the stages pending on any node, in order."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1 $2 $3" = "-m rlhf.cli preflight" ]; then echo "preflight ok (stand-in)"; exit 0; fi\n'
        'if [ "$1 $2 $3" = "-m rlhf.cli fetch" ]; then exit 0; fi\n'
        'if [ "$1 $2" = "-m deepspeed.launcher.runner" ]; then\n'
        '  while [ "$1" != rlhf.cli ]; do shift; done; echo "$2" >> "$RAN"; exit 0\nfi\n'
        f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    port, procs = str(_free_port()), []
    for node in (0, 1):
        out_dir = tmp_path / f"node{node}"
        for stage in complete[node]:
            (out_dir / "tiny" / stage).mkdir(parents=True)
            (out_dir / "tiny" / stage / "stage.json").write_text(json.dumps({"stage": stage}))
        env = _env(tmp_path, PY=str(fake), NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, NUM_GPUS="1", RAN=str(tmp_path / f"ran{node}"), LOG_DIR=str(tmp_path / "logs"),
                   RLHF_AGREE_TIMEOUT_S="60")
        procs.append(subprocess.Popen(["bash", "stages/pipeline.sh", "configs/tiny.yaml", "--set",
                                       f"run.output_dir={out_dir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    ran = [(tmp_path / f"ran{node}").read_text().split() if (tmp_path / f"ran{node}").exists() else []
           for node in (0, 1)]
    expected = [s for s in ("sft", "reward", "ppo") if s not in complete[0] & complete[1]]
    assert ran == [expected, expected], outs
    for out in outs:
        assert all(f"[pipeline] {s}: starting" in out for s in expected)
        assert all(f"[pipeline] {s}: complete, skipping" in out for s in {"sft", "reward", "ppo"} - set(expected))


def test_a_single_stage_script_runs_its_preflight_before_launching(tmp_path, rlhf_cache):
    """A busy master port stops `stages/0*.sh` in one line, exit 2, before the launcher starts (it would die
    with a bind error on every rank, or hang); DRY_RUN shows the preflight, --restart left to the stage."""
    env = _env(tmp_path, PY=sys.executable, NUM_GPUS="2", RLHF_CACHE=str(rlhf_cache))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _bash(["stages/02_reward.sh", "configs/reward_only.yaml", "--set", f"run.output_dir={tmp_path}/runs"],
                     {**env, "MASTER_PORT": str(port)})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"MASTER_PORT={port} is in use on this (master) node" in proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "reward-only"
    assert "deepspeed.launcher" not in proc.stdout + proc.stderr and not (run_dir / "logs").exists()
    assert not (run_dir / "reward").exists()
    dry = _bash(["stages/03_ppo.sh", "configs/tiny.yaml", "--restart"], {**env, "DRY_RUN": "1"})
    lines = dry.stdout.splitlines()
    assert lines[0] == f"[dry-run] preflight: {sys.executable} -m rlhf.cli preflight --stage ppo --config configs/tiny.yaml"
    assert "--restart" not in lines[1] and "--restart" in lines[2]  # lines[1]: the fetch
