"""`guards.catch_oom`: a CUDA out-of-memory error is one line naming the stage, the model, the checkpoint
kept and the `rlhf plan` command and settings to try (exit 3); other errors pass through unchanged."""

from __future__ import annotations

import pytest
import torch

from rlhf import artifacts
from rlhf.errors import TrainingError
from rlhf.guards import catch_oom

TORCH_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.25 GiB of which "
             "1.06 GiB is free. Including non-PyTorch memory, this process has 78.18 GiB memory in use. If "
             "reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


def _oom_message(*args, error=TORCH_OOM, **kwargs) -> TrainingError:
    with pytest.raises(TrainingError) as info, catch_oom(*args, **kwargs):
        raise torch.OutOfMemoryError(error)
    return info.value


def test_trainer_stage_message_names_stage_model_checkpoint_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "8")
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        artifacts.mark_checkpoint_complete(ckpts / f"checkpoint-{step}", step)
    (ckpts / "checkpoint-6").mkdir()  # no completion marker: never a resume point
    err = _oom_message("sft", "policy", ckpts, "configs/pipeline.yaml")
    assert err.exit_code == 3
    assert str(err) == (
        "sft: CUDA out of memory in the policy model (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
        "total capacity of 79.25 GiB of which 1.06 GiB is free); the last complete checkpoint "
        f"{ckpts / 'checkpoint-4'} is kept; run `rlhf plan --config configs/pipeline.yaml --gpus 4 --nodes 2 "
        "--stage sft` and try deepspeed.zero_stage=3, then deepspeed.offload_optimizer=true and "
        "deepspeed.offload_param=true, or a smaller sft.batch_size")


def test_ppo_roles_name_their_own_deepspeed_keys_and_no_checkpoint_yet(tmp_path):
    err = _oom_message("ppo", "ref", tmp_path / "none", None, error="CUDA out of memory. Tried to allocate 8.00 MiB")
    message = str(err)
    assert message.startswith("ppo: CUDA out of memory in the ref model (CUDA out of memory. Tried to allocate "
                              "8.00 MiB); no complete checkpoint yet; run `rlhf plan --config "
                              "FILE --gpus 1 --stage ppo` and try deepspeed.ref.zero_stage=3, then "
                              "deepspeed.ref.offload_param=true, or a smaller ppo.rollout_batch_size")
    assert "offload_optimizer" not in message  # a frozen model has no optimizer state
    actor = str(_oom_message("ppo", "actor", tmp_path, "c.yaml"))
    assert "deepspeed.actor.offload_optimizer=true and deepspeed.actor.offload_param=true" in actor


def test_held_out_checks_name_the_eval_batch_and_cuda_alias_is_caught(tmp_path):
    with pytest.raises(TrainingError, match=r"or a smaller reward\.eval_batch_size$"):
        with catch_oom("reward", "reward", tmp_path, "c.yaml", batch_key="reward.eval_batch_size"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(RuntimeError, match="CUDA error: an illegal memory access"):
        with catch_oom("sft", "policy", tmp_path):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
