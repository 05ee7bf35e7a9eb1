"""Helpers for stage tests: the tiny config pointed at a temp run dir, and a subprocess CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from rlhf.config import config_from_dict

ROOT = Path(__file__).resolve().parents[2]


def tiny_raw(tmp_path: Path, drop: tuple[str, ...] = ()) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    for key in ("sft", "preference", "prompts"):
        raw["data"][key] = str(ROOT / raw["data"][key])
    for key in drop:
        raw.pop(key, None)
    return raw


def tiny_cfg(tmp_path: Path, overrides: list[str] | None = None, drop: tuple[str, ...] = ()):
    return config_from_dict(tiny_raw(tmp_path, drop), source="tiny.yaml", overrides=overrides)


def write_cfg(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def cli_env(cache: Path | None = None) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
                "PYTHONUNBUFFERED": "1"})
    if cache is not None:
        env["RLHF_CACHE"] = str(cache)
    return env


def run_cli(args: list[str], *, env: dict, timeout: float = 300, launcher: list[str] | None = None):
    cmd = (launcher or [sys.executable, "-m", "rlhf.cli"]) + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
