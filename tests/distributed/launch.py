"""Start `rlhf` under the deepspeed launcher with CPU ranks (gloo), on a free port, for distributed tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from rlhf import artifacts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_rank_env(**extra: str) -> dict[str, str]:
    """The environment of CPU ranks under a launcher: gloo, one OpenMP thread each, offline."""
    return {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}


def deepspeed_cli(args: list[str], *, nproc: int = 2, timeout: int = 300, cwd: Path | None = None,
                  script: Path | None = None, env: dict[str, str] | None = None):
    """`deepspeed --num_gpus N --module rlhf.cli ARGS` with DS_ACCELERATOR=cpu; returns CompletedProcess.
    `script` runs that file instead of the module (e.g. tests/faults/faulty_cli.py); `env` adds variables.

    Each launch gets an empty torch extensions dir, as on a fresh machine, and fails if DeepSpeed compiled
    an op into it (a compile costs minutes on a 2-core machine with no build cache, as on CI) or left
    files in /dev/shm."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    extensions = tempfile.mkdtemp(prefix="rlhf-torch-ext-")
    env = cpu_rank_env(TORCH_EXTENSIONS_DIR=extensions, **(env or {}))
    target = [str(script)] if script is not None else ["--module", "rlhf.cli"]
    cmd = [launcher, "--num_gpus", str(nproc), "--master_port", str(free_port()), *target, *args]
    shm_before = _shared_memory()
    try:
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        built = sorted(p.name for p in Path(extensions).iterdir())
    finally:
        shutil.rmtree(extensions, ignore_errors=True)
    assert not built, f"the launch compiled DeepSpeed ops {built}; ranks must not build C++ ops on CPU"
    left = sorted(_shared_memory() - shm_before)
    assert not left, f"the launch left {left} in /dev/shm (RAM that stays taken after the ranks exit)"
    return proc


def _shared_memory() -> set[str]:
    """DeepSpeed's files in /dev/shm (its CPU all-reduce buffers are 69 MB per rank and never removed)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed*")} if shm.is_dir() else set()


def ppo_config(tmp_path: Path, policy: Path, reward: Path, *, zero_stage: int, ppo: dict, run: dict | None = None,
               name: str = "ppo.yaml") -> Path:
    """A PPO config on the tiny models: finished sft/ and reward/ stages under <tmp>/runs/t (kept when
    present, for resume tests), 16 prompts, DeepSpeed at `zero_stage`; `ppo` and `run` update the defaults."""
    run_dir = tmp_path / "runs" / "t"
    for stage, src in (("sft", policy), ("reward", reward)):
        if not (run_dir / stage / artifacts.MANIFEST).exists():
            shutil.copytree(src, run_dir / stage / "final")
            artifacts.write_manifest(run_dir / stage, stage, inputs={}, config_hash="test", metrics={})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Question number {i}?"}]}) + "\n"
                               for i in range(16)), encoding="utf-8")
    cfg = {"run": {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu", **(run or {})},
           "model": {"name_or_path": str(policy)},
           "data": {"prompts": str(prompts), "eval_fraction": 0.0, "max_length": 96, "max_prompt_length": 32},
           "final_stage": "ppo",
           "ppo": {"rollout_batch_size": 4, "max_new_tokens": 8, "ppo_epochs": 1, **ppo},
           "deepspeed": {"enabled": True, "zero_stage": zero_stage},
           "logging": {"progress": False, "tensorboard": False, "plots": False}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path
