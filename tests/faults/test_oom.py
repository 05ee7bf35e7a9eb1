"""CUDA out of memory (raised on CPU as torch raises it on a GPU): the run ends with exit 3 and one line naming
the stage, the model, the last complete checkpoint (kept) and the `rlhf plan` command and settings to try."""

from __future__ import annotations

import pytest
import torch
from faultkit import cfg_of, error_lines, extra_callback, tiny_raw, write_cfg
from transformers import TrainerCallback

from rlhf import artifacts, cli
from rlhf.errors import TrainingError
from rlhf.stages import reward, run_stage

pytestmark = pytest.mark.slow
TORCH_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError(TORCH_OOM)


class _OomInForwardAtStep(TrainerCallback):
    """From optimizer step `step` on, the model's forward raises CUDA's out-of-memory error."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            model.register_forward_pre_hook(_raise_oom)


def test_oom_in_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, rlhf_cache, capsys):
    raw = tiny_raw(tmp_path, final_stage=None)
    config = write_cfg(tmp_path / "cfg.yaml", raw)
    ckpts = cfg_of(raw).stage_dir("sft") / "checkpoints"
    with extra_callback(_OomInForwardAtStep(3)):
        assert cli.main(["sft", "--config", str(config)]) == 3
    assert error_lines(capsys.readouterr().err) == [
        f"error: sft: CUDA out of memory in the policy model ({TORCH_OOM}); the last complete checkpoint "
        f"{ckpts / 'checkpoint-2'} is kept; run `rlhf plan --config {config} --gpus 1 --stage sft` and try "
        "deepspeed.zero_stage=3, then deepspeed.offload_optimizer=true and deepspeed.offload_param=true, or a "
        "smaller sft.batch_size"]
    assert [p.name for p in artifacts.list_checkpoints(ckpts)] == ["checkpoint-2"]
    assert not artifacts.is_complete(cfg_of(raw).stage_dir("sft"))


def test_oom_in_the_reward_heldout_check_names_the_eval_batch(tmp_path, rlhf_cache, tiny_model_dir, monkeypatch):
    raw = tiny_raw(tmp_path, final_stage=None)
    raw["reward"].update({"max_steps": 2, "base_model": str(tiny_model_dir)})
    cfg = cfg_of(raw)
    monkeypatch.setattr(reward, "pair_scores", _raise_oom)
    with pytest.raises(TrainingError) as info:
        run_stage("reward", cfg)
    ckpts = cfg.stage_dir("reward") / "checkpoints"
    assert str(info.value).startswith(f"reward: CUDA out of memory in the reward model ({TORCH_OOM}); the last "
                                      f"complete checkpoint {ckpts / 'checkpoint-2'} is kept; run `rlhf plan")
    assert str(info.value).endswith("or a smaller reward.eval_batch_size") and info.value.exit_code == 3
    assert not artifacts.is_complete(cfg.stage_dir("reward"))
