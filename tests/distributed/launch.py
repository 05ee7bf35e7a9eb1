"""Start `rlhf` under the deepspeed launcher with CPU ranks (gloo), on a free port, for distributed tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_cli(args: list[str], *, nproc: int = 2, timeout: int = 300, cwd: Path | None = None,
                  script: Path | None = None, env: dict[str, str] | None = None):
    """`deepspeed --num_gpus N --module rlhf.cli ARGS` with DS_ACCELERATOR=cpu; returns CompletedProcess.
    `script` runs that file instead of the module (e.g. tests/faults/faulty_cli.py); `env` adds variables."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **(env or {})}
    target = [str(script)] if script is not None else ["--module", "rlhf.cli"]
    cmd = [launcher, "--num_gpus", str(nproc), "--master_port", str(free_port()), *target, *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
