"""A save that fails (disk full, file-size limit, unwritable dir) ends the run with one line and exit 3, removes
the half-written checkpoint (it never gets a completion marker), and leaves the previous checkpoint intact:
the same command resumes from it once there is space again."""

from __future__ import annotations

import errno
import resource
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
from safetensors.torch import load_file

from rlhf import artifacts, engine
from rlhf.errors import StopRequested, TrainingError
from rlhf.stages import common, run_stage

pytestmark = pytest.mark.slow

FILE_LIMIT = 200_000  # bytes per file: the tiny model's weights (about 550 kB) no longer fit


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def test_file_size_limit_during_checkpoint_save(tmp_path, rlhf_cache):
    raw = tiny_raw(tmp_path, final_stage=None)
    config = write_cfg(tmp_path / "cfg.yaml", raw)
    cfg = cfg_of(raw)
    ckpts = cfg.stage_dir("sft") / "checkpoints"
    # A first run leaves checkpoint-2 (stopped by SIGTERM at step 2).
    with extra_callback(TermAtStep(2)), pytest.raises(StopRequested):
        run_stage("sft", cfg)
    good = load_file(str(ckpts / "checkpoint-2" / "model.safetensors"))

    # The same command with a 200 kB file-size limit: resumes, trains steps 3-4, the save of checkpoint-4 fails.
    full = run_cli(["sft", "--config", str(config)], rlhf_cache, preexec_fn=_limit_file_size)
    assert full.returncode == 3, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    (line,) = error_lines(full.stderr)
    assert line.startswith(f"error: {ckpts / 'checkpoint-4'}: saving the checkpoint failed (")
    assert "File too large" in line
    assert line.endswith("); free disk space or fix permissions, then re-run the same command to resume from "
                         f"{ckpts / 'checkpoint-2'}")
    assert not (ckpts / "checkpoint-4").exists()  # the partial dir is gone; it was never marked complete
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-2"]
    kept = load_file(str(ckpts / "checkpoint-2" / "model.safetensors"))
    assert kept.keys() == good.keys() and all((kept[k] == good[k]).all() for k in good)

    # With the limit gone, the same command resumes from checkpoint-2 and finishes.
    run_stage("sft", cfg)
    assert manifest_step(cfg.stage_dir("sft")) == 8
    assert logged_steps(cfg.stage_dir("sft"), "loss") == list(range(1, 9))


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_final(tmp_path, rlhf_cache, monkeypatch):
    cfg = cfg_of(tiny_raw(tmp_path, final_stage=None))
    stage_dir = cfg.stage_dir("sft")
    save_resolved = common.save_resolved

    def no_space_in_final(cfg, path):  # the stage also writes its resolved config when it starts
        if path.parent.name == "final.tmp":
            _no_space()
        return save_resolved(cfg, path)

    monkeypatch.setattr(common, "save_resolved", no_space_in_final)
    with pytest.raises(TrainingError) as info:
        run_stage("sft", cfg)
    assert str(info.value) == (f"{stage_dir / 'final.tmp'}: saving the final model failed (No space left on device); "
                               "free disk space or fix permissions, then re-run the same command to resume from "
                               f"{stage_dir / 'checkpoints' / 'checkpoint-8'}")
    assert not (stage_dir / "final").exists() and not (stage_dir / artifacts.MANIFEST).exists()
    monkeypatch.setattr(common, "save_resolved", save_resolved)
    run_stage("sft", cfg)  # resumes at the last step: nothing is trained again, final/ is written
    assert manifest_step(stage_dir) == 8 and (stage_dir / "final" / "model.safetensors").is_file()
    assert logged_steps(stage_dir, "loss") == list(range(1, 9))


def test_ppo_disk_full_during_checkpoint(tmp_path, rlhf_cache, tiny_model_dir, tiny_reward_dir, monkeypatch):
    raw = tiny_raw(tmp_path, final_stage="ppo")
    raw["ppo"].update({"steps": 3, "save_steps": 1})
    cfg = cfg_of(raw)
    fake_stage(cfg.run.dir, "sft", tiny_model_dir)
    fake_stage(cfg.run.dir, "reward", tiny_reward_dir)
    ckpts = cfg.stage_dir("ppo") / "checkpoints"
    save_engine = engine.save_engine

    def critic_save_fails_at_step_2(eng, path):
        if path.parent.name == "checkpoint-2" and path.name == "critic":
            _no_space()
        save_engine(eng, path)

    monkeypatch.setattr(engine, "save_engine", critic_save_fails_at_step_2)
    with pytest.raises(TrainingError) as info:
        run_stage("ppo", cfg)
    assert str(info.value) == (f"{ckpts / 'checkpoint-2'}: saving the checkpoint failed (No space left on device); "
                               "free disk space or fix permissions, then re-run the same command to resume from "
                               f"{ckpts / 'checkpoint-1'}")
    assert not (ckpts / "checkpoint-2").exists()
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-1"]
    monkeypatch.setattr(engine, "save_engine", save_engine)
    run_stage("ppo", cfg)
    assert manifest_step(cfg.stage_dir("ppo")) == 3
    assert logged_steps(cfg.stage_dir("ppo"), "policy/loss") == [1, 2, 3]


def test_disk_full_when_a_stage_starts_is_one_line(tmp_path, rlhf_cache, monkeypatch):
    cfg = cfg_of(tiny_raw(tmp_path, final_stage=None))
    monkeypatch.setattr(common, "save_resolved", _no_space)
    with pytest.raises(TrainingError) as info:
        run_stage("sft", cfg)
    assert str(info.value) == (f"{cfg.stage_dir('sft') / 'config.resolved.yaml'}: saving the resolved config failed "
                               "(No space left on device); free disk space or fix permissions, then re-run the same "
                               "command to start over (no complete checkpoint yet)")
