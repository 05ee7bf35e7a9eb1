"""`bash stages/pipeline.sh configs/tiny.yaml` end to end on CPU: runs SFT, reward and PPO; a second run
skips all three; without PPO's stage.json only PPO runs again; a failing stage stops the pipeline with its
exit code and leaves no stage.json; a missing data file is refused before any stage starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STAGES = ("sft", "reward", "ppo")
SMALL = ["--set", "sft.max_steps=4", "--set", "reward.max_steps=4", "--set", "ppo.steps=2",
         "--set", "logging.plots=false", "--set", "logging.tensorboard=false"]


def _pipeline(out: Path, cache: Path, *extra: str, py: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "PY": py, "RLHF_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
           "TOKENIZERS_PARALLELISM": "false"}
    for key in ("NUM_GPUS", "NNODES", "HOSTFILE", "LAUNCHER", "LOG_DIR", "RLHF_GPU_MEM_GIB"):
        env.pop(key, None)
    cmd = ["bash", "stages/pipeline.sh", "configs/tiny.yaml", "--set", f"run.output_dir={out}", *SMALL, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _mtimes(run: Path) -> dict[str, float]:
    return {s: (run / s / "stage.json").stat().st_mtime_ns for s in STAGES if (run / s / "stage.json").exists()}


def test_pipeline_runs_skips_and_resumes(tmp_path, rlhf_cache):
    out, run = tmp_path / "runs", tmp_path / "runs" / "tiny"
    first = _pipeline(out, rlhf_cache)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in STAGES:
        assert f"[pipeline] {stage}: starting" in first.stdout
        assert (run / stage / "final").is_dir() and (run / "logs" / f"{stage}.log").is_file()
    done = _mtimes(run)
    assert set(done) == set(STAGES)

    again = _pipeline(out, rlhf_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"[pipeline] {s}: complete, skipping" in again.stdout for s in STAGES)
    assert "starting" not in again.stdout and _mtimes(run) == done

    (run / "ppo" / "stage.json").unlink()
    resumed = _pipeline(out, rlhf_cache)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[pipeline] sft: complete, skipping" in resumed.stdout
    assert "[pipeline] reward: complete, skipping" in resumed.stdout
    assert "[pipeline] ppo: starting" in resumed.stdout
    after = _mtimes(run)
    assert after["sft"] == done["sft"] and after["reward"] == done["reward"] and after["ppo"] > done["ppo"]

    # A stage that fails stops the pipeline with its exit code and no stage.json: a Python that exits 3
    # for `rlhf.cli ppo` stands in for a crashing stage.
    (run / "ppo" / "stage.json").unlink()
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\nif [ "${{1:-}}" = -m ] && [ "${{3:-}}" = ppo ]; then\n'
                    f'  echo "error: ppo crashed" >&2; exit 3\nfi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    failed = _pipeline(out, rlhf_cache, py=str(fake))
    assert failed.returncode == 3 and "error: ppo crashed" in failed.stdout + failed.stderr
    assert "[pipeline] done" not in failed.stdout
    assert not (run / "ppo" / "stage.json").exists()


def test_missing_data_file_stops_before_any_stage(tmp_path, rlhf_cache):
    proc = _pipeline(tmp_path / "runs", rlhf_cache, "--set", f"data.sft={tmp_path / 'nope.jsonl'}")
    assert proc.returncode == 2
    assert "nope.jsonl" in proc.stderr and "blocked:" in proc.stderr
    assert "starting" not in proc.stdout
    assert not list((tmp_path / "runs").rglob("stage.json"))
