"""Shared setup for the fault tests: tiny configs, finished earlier stages, and CLI runs with a fault injected."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from rlhf import artifacts
from rlhf.config import config_from_dict
from rlhf.stages import common
from rlhf.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BAD = ROOT / "tests" / "data" / "bad"
FAULTY_CLI = HERE / "faulty_cli.py"

# Small enough that a Trainer stage takes about a second; save_steps 2 gives several checkpoints to kill around.
STEPS = {"max_steps": 8, "save_steps": 2, "logging_steps": 1, "batch_size": 4, "eval_batch_size": 8}
PPO_STEPS = {"steps": 6, "save_steps": 2, "rollout_batch_size": 4, "mini_batch_size": 4, "grad_accum": 1,
             "ppo_epochs": 1, "max_new_tokens": 8, "sample_every": 2}


def tiny_raw(run_root: Path, *, final_stage: str | None = "ppo") -> dict:
    """configs/tiny.yaml with absolute data paths, outputs under run_root, short stages, no TensorBoard/plots."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["run"]["output_dir"] = str(run_root / "runs")
    for key in ("sft", "preference", "prompts"):
        raw["data"][key] = str(ROOT / raw["data"][key])
    for stage in ("sft", "reward", "dpo", "orpo"):
        raw[stage].update(STEPS)
    raw["ppo"].update(PPO_STEPS)
    raw["final_stage"] = final_stage
    if final_stage is None:
        del raw["final_stage"]
    raw["logging"] = {"progress": False, "tensorboard": False, "plots": False}
    return raw


def cfg_of(raw: dict, source: str = "faults.yaml"):
    return config_from_dict(raw, source=source)


def write_cfg(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def fake_stage(run_dir: Path, stage: str, model_dir: Path) -> None:
    """Make `stage` look finished: a copy of `model_dir` as its final/ plus its stage.json."""
    if (run_dir / stage / artifacts.MANIFEST).exists():
        return
    shutil.copytree(model_dir, run_dir / stage / "final")
    artifacts.write_manifest(run_dir / stage, stage, inputs={}, config_hash="test", metrics={})


def cli_env(cache: Path, fault: str | None = None) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
                "PYTHONUNBUFFERED": "1", "RLHF_CACHE": str(cache), "TRL_EXPERIMENTAL_SILENCE": "1"})
    env.pop("RLHF_FAULT", None)
    if fault:
        env["RLHF_FAULT"] = fault
    return env


def run_cli(args: list[str], cache: Path, *, fault: str | None = None, preexec_fn=None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`rlhf <args>` in a fresh process (through faulty_cli.py, which is the plain CLI when fault is None)."""
    return subprocess.run([sys.executable, str(FAULTY_CLI), *args], cwd=ROOT, env=cli_env(cache, fault),
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "blocked:"))]


def logged_steps(stage_dir: Path, key: str) -> list[int]:
    """Steps of the metrics.jsonl rows that carry `key`, in file order."""
    return [row["step"] for row in read_metrics(stage_dir / "metrics.jsonl") if key in row]


def manifest_step(stage_dir: Path) -> int:
    return json.loads((stage_dir / artifacts.MANIFEST).read_text())["global_step"]


class TermAtStep(TrainerCallback):
    """Sends this process SIGTERM at the start of optimizer step `step` (the stage then stops after it)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def extra_callback(callback) -> Iterator[None]:
    """Trainer stages started inside the block also get `callback`."""
    with pytest.MonkeyPatch.context() as mp:
        callbacks = common.StageRun.callbacks
        mp.setattr(common.StageRun, "callbacks", lambda self: callbacks(self) + [callback])
        yield
