"""Graceful stop: SIGTERM (what Slurm and Kubernetes send before preemption) finishes the current step, saves
a checkpoint at that step, and ends the command with exit 0 and "resume with the same command"; running the
same command again resumes there and reaches the full step count. (PPO: tests/stages/test_ppo.py.)"""

from __future__ import annotations

import signal

import pytest
from faultkit import (
    TermAtStep,
    cfg_of,
    error_lines,
    extra_callback,
    fake_stage,
    logged_steps,
    manifest_step,
    run_cli,
    tiny_raw,
    write_cfg,
)

from rlhf import artifacts
from rlhf.errors import StopRequested
from rlhf.stages import run_stage

pytestmark = pytest.mark.slow


def test_sigterm_cli_saves_exits_0_and_resumes(tmp_path, rlhf_cache, caplog):
    raw = tiny_raw(tmp_path, final_stage=None)
    config = write_cfg(tmp_path / "cfg.yaml", raw)
    stage_dir = cfg_of(raw).stage_dir("sft")
    ckpts = stage_dir / "checkpoints"
    stopped = run_cli(["sft", "--config", str(config)], rlhf_cache, fault="term_in_step:3")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last == (f"sft: stopped on SIGTERM at step 3 after saving a checkpoint in {ckpts}; "
                    "resume with the same command")
    assert not error_lines(stopped.stderr)
    # Step 3 is not a save step (save_steps 2): the checkpoint is there because of the SIGTERM.
    assert artifacts.latest_checkpoint(ckpts).name == "checkpoint-3"
    assert not (stage_dir / artifacts.MANIFEST).exists() and not (stage_dir / "final").exists()

    caplog.set_level("INFO", logger="rlhf")
    run_stage("sft", cfg_of(raw))  # the same command again, in this process (the CLI path is shown above)
    assert f"resuming from {ckpts / 'checkpoint-3'}" in caplog.text
    assert manifest_step(stage_dir) == 8
    assert logged_steps(stage_dir, "loss") == list(range(1, 9))


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_sigterm_in_process_stops_then_resumes(stage, tmp_path, rlhf_cache, tiny_model_dir):
    raw = tiny_raw(tmp_path, final_stage="dpo" if stage == "dpo" else None)
    raw["reward"]["base_model"] = str(tiny_model_dir)
    cfg = cfg_of(raw)
    if stage == "dpo":
        fake_stage(cfg.run.dir, "sft", tiny_model_dir)
    handler_before = signal.getsignal(signal.SIGTERM)
    with extra_callback(TermAtStep(5)), pytest.raises(StopRequested, match=f"{stage}: stopped on SIGTERM at step 5 "
                                                      ".*resume with the same command"):
        run_stage(stage, cfg)
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the stage's handler is gone again
    ckpts = cfg.stage_dir(stage) / "checkpoints"
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-4", "checkpoint-5"]
    assert not (cfg.stage_dir(stage) / artifacts.MANIFEST).exists()

    run_stage(stage, cfg)
    assert manifest_step(cfg.stage_dir(stage)) == 8
    assert logged_steps(cfg.stage_dir(stage), "loss") == list(range(1, 9))
