"""SIGKILL at exact points (inside a step, mid-save, between stages), then the same command again.

Each kill is the process killing itself with SIGKILL at a chosen point (faulty_cli.py), so the test is
deterministic and nothing runs after the kill, so the killed run's claim on the stage dir stays behind and
the re-run takes it over (its pid is gone). The re-run must resume from the last *complete* checkpoint,
delete (never load) a half-written one, and end with the same optimizer-step count and the same logged step
sequence as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import signal
import socket

import pytest
import torch
from faultkit import (
    cfg_of,
    fake_stage,
    logged_steps,
    manifest_step,
    run_cli,
    tiny_raw,
    write_cfg,
)
from safetensors.torch import load_file

from rlhf import artifacts, claims
from rlhf.stages import run_pipeline, run_stage

pytestmark = pytest.mark.slow

KILLED = -signal.SIGKILL
# stage -> (final_stage of the file, metric logged once per step, total steps, kill inside this step,
#           kill while saving this checkpoint). Checkpoints every 2 steps.
CASES = {
    "sft": (None, "loss", 8, 5, 6),
    "reward": (None, "loss", 8, 5, 6),
    "dpo": ("dpo", "loss", 8, 5, 6),
    "ppo": ("ppo", "policy/loss", 6, 3, 4),
}


def _setup(root, stage, tiny_model_dir, tiny_reward_dir) -> dict:
    final_stage = CASES[stage][0]
    raw = tiny_raw(root, final_stage=final_stage)
    if stage == "reward":
        raw["reward"]["base_model"] = str(tiny_model_dir)
    run_dir = root / "runs" / raw["run"]["name"]
    if stage in ("dpo", "ppo"):
        fake_stage(run_dir, "sft", tiny_model_dir)
    if stage == "ppo":
        fake_stage(run_dir, "reward", tiny_reward_dir)
    return raw


def _half_written(ckpt_dir, step: int) -> None:
    """A checkpoint dir as a kill mid-write leaves it: no marker, a truncated weights file."""
    path = ckpt_dir / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "model.safetensors").write_bytes(b"\x00\x01truncated")
    (path / "trainer_state.json").write_text('{"global_step": ', encoding="utf-8")


def _weights(final_dir) -> dict:
    return load_file(str(final_dir / "model.safetensors"))


@pytest.mark.parametrize("stage", list(CASES))
def test_sigkill_in_step_and_mid_save_then_resume(stage, tmp_path, rlhf_cache, tiny_model_dir, tiny_reward_dir,
                                                  caplog):
    _, key, total, in_step, mid_save = CASES[stage]
    # The reference: the same stage uninterrupted, in this process.
    ref_raw = _setup(tmp_path / "ref", stage, tiny_model_dir, tiny_reward_dir)
    ref_cfg = cfg_of(ref_raw)
    run_stage(stage, ref_cfg)
    ref_dir = ref_cfg.stage_dir(stage)
    assert manifest_step(ref_dir) == total

    raw = _setup(tmp_path / "killed", stage, tiny_model_dir, tiny_reward_dir)
    config = write_cfg(tmp_path / "killed" / "cfg.yaml", raw)
    stage_dir = cfg_of(raw).stage_dir(stage)
    ckpts = stage_dir / "checkpoints"
    command = [stage, "--config", str(config)]

    # 1. Killed inside a step: the complete checkpoints before it survive, nothing is marked done.
    first = run_cli(command, rlhf_cache, fault=f"kill_in_step:{in_step}")
    assert first.returncode == KILLED, first.stderr[-2000:]
    before = in_step - 1 - (in_step - 1) % 2
    assert artifacts.latest_checkpoint(ckpts).name == f"checkpoint-{before}"
    assert not (stage_dir / artifacts.MANIFEST).exists()
    killed = json.loads((stage_dir / claims.CLAIM).read_text())  # nothing ran after the kill: its claim stays

    # 2. Same command, killed while saving checkpoint-<mid_save>: it resumed, and the new dir has no marker.
    second = run_cli(command, rlhf_cache, fault=f"kill_before_marker:{mid_save}")
    assert second.returncode == KILLED, second.stderr[-2000:]
    assert f"resuming from {ckpts / f'checkpoint-{before}'}" in second.stderr
    assert (f"{stage_dir}: taking over the claim of pid {killed['pid']} on {socket.gethostname()}" in second.stderr
            and "its process is gone" in second.stderr)
    killed = json.loads((stage_dir / claims.CLAIM).read_text())
    assert (ckpts / f"checkpoint-{mid_save}").is_dir()
    assert not (ckpts / f"checkpoint-{mid_save}" / artifacts.COMPLETE_MARKER).exists()
    assert artifacts.latest_checkpoint(ckpts).name == f"checkpoint-{before}"
    # Make the half-written checkpoints unloadable: loading either would crash the next run.
    (ckpts / f"checkpoint-{mid_save}" / "model.safetensors").write_bytes(b"garbage")
    _half_written(ckpts, mid_save + 1)

    # 3. Same command, no fault (in this process, to save a start-up): both half-written dirs are removed
    # unread, the run resumes and finishes.
    caplog.set_level(logging.INFO, logger="rlhf")
    run_stage(stage, cfg_of(raw))
    assert f"resuming from {ckpts / f'checkpoint-{before}'}" in caplog.text
    assert f"{stage_dir}: taking over the claim of pid {killed['pid']} on" in caplog.text
    assert not (stage_dir / claims.CLAIM).exists()
    for step in (mid_save, mid_save + 1):
        assert f"{ckpts / f'checkpoint-{step}'}: removed an incomplete checkpoint" in caplog.text
    assert not (ckpts / f"checkpoint-{mid_save + 1}").exists()
    assert all((path / artifacts.COMPLETE_MARKER).is_file() for path in ckpts.glob("checkpoint-*"))
    assert manifest_step(stage_dir) == manifest_step(ref_dir) == total
    steps = logged_steps(stage_dir, key)
    assert steps == logged_steps(ref_dir, key) == list(range(1, total + 1))  # no duplicates, none missing
    # Resuming restores weights, optimizer, schedule, data order and RNG: the result matches the reference.
    resumed, reference = _weights(stage_dir / "final"), _weights(ref_dir / "final")
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sigkill_between_pipeline_stages(tmp_path, rlhf_cache, caplog):
    raw = tiny_raw(tmp_path, final_stage="dpo")  # sft -> dpo
    config = write_cfg(tmp_path / "cfg.yaml", raw)
    cfg = cfg_of(raw)
    sft_dir, dpo_dir = cfg.stage_dir("sft"), cfg.stage_dir("dpo")
    command = ["pipeline", "--config", str(config)]

    # Killed after sft renamed final/ into place but before its stage.json: sft is not done.
    first = run_cli(command, rlhf_cache, fault="kill_before_manifest:sft")
    assert first.returncode == KILLED, first.stderr[-2000:]
    assert (sft_dir / "final").is_dir() and not (sft_dir / artifacts.MANIFEST).exists()
    assert not dpo_dir.exists()

    # Re-run: sft resumes from its last checkpoint (step 8: no step is trained twice), finishes, and the
    # process is killed right after sft's stage.json, before dpo starts.
    second = run_cli(command, rlhf_cache, fault="kill_after_stage:sft")
    assert second.returncode == KILLED, second.stderr[-2000:]
    assert "sft: resuming from" in second.stderr and "checkpoint-8" in second.stderr
    sft_manifest = json.loads((sft_dir / artifacts.MANIFEST).read_text())
    assert sft_manifest["global_step"] == 8 and not dpo_dir.exists()

    # Re-run (in this process): sft is skipped untouched, dpo runs to the end.
    caplog.set_level(logging.INFO, logger="rlhf")
    run_pipeline(cfg_of(raw))
    assert f"sft: complete ({sft_dir / artifacts.MANIFEST} exists), skipping" in caplog.text
    assert json.loads((sft_dir / artifacts.MANIFEST).read_text()) == sft_manifest
    assert logged_steps(sft_dir, "loss") == list(range(1, 9))
    assert manifest_step(dpo_dir) == 8 and logged_steps(dpo_dir, "loss") == list(range(1, 9))
