"""Reading a DeepSpeed checkpoint (`engine.deepspeed_state_dict`, what `rlhf export` uses) never runs its
pickle: the `*_states.pt` files are read with torch's weights-only unpickler, DeepSpeed's own checkpoint
types allowed by name. A crafted file whose payload would create a marker dir is refused in one line, in
both of DeepSpeed's layouts (ZeRO-0's model file, and the ZeRO 1-3 shards DeepSpeed's zero_to_fp32 reads),
and also through `rlhf export` of a Trainer checkpoint that holds only DeepSpeed shards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from rlhf import engine
from rlhf.cli import main
from rlhf.errors import ArtifactError

REFUSED = "a checkpoint file holds a pickled posix.mkdir, neither a tensor nor a type DeepSpeed saves"


class Payload:
    """Unpickling this calls os.mkdir(marker): a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _crafted(ds_dir: Path, marker: Path, *, sharded: bool) -> None:
    ds_dir.mkdir(parents=True)
    module = {"w": torch.zeros(2), "payload": Payload(marker)}
    if sharded:  # the ZeRO 1-3 layout: DeepSpeed's zero_to_fp32 unpickles the model states first
        torch.save({"module": module, "buffer_names": []}, ds_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {}}, ds_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    else:
        torch.save({"module": module}, ds_dir / "mp_rank_00_model_states.pt")


@pytest.mark.parametrize("sharded", [False, True], ids=["zero0", "zero1-3"])
def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, sharded):
    marker = tmp_path / "payload-ran"
    _crafted(tmp_path / "actor" / "state", marker, sharded=sharded)
    with pytest.raises(ArtifactError) as err:
        engine.deepspeed_state_dict(tmp_path / "actor", tag="state")
    assert not marker.exists()
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'actor' / 'state'}: {REFUSED}") and "\n" not in message
    assert "export checkpoints written by the rlhf stages" in message
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the forcing ends with the read


def test_deepspeed_types_in_a_checkpoint_are_allowed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    ds_dir = tmp_path / "state"
    ds_dir.mkdir()
    weights = {"w": torch.arange(3.0)}
    torch.save({"module": weights, "zero_stage": ZeroStageEnum.disabled,
                "optimizer": {"scalers": [LossScaler(1.0), DynamicLossScaler(2.0**16, 1000, 1.0, 2, True)],
                              "mapping": fragment_address(numel=3, start=0)}}, ds_dir / "mp_rank_00_model_states.pt")
    got = engine.deepspeed_state_dict(tmp_path, tag="state")
    torch.testing.assert_close(got, weights)


def test_export_refuses_a_crafted_trainer_checkpoint(tmp_path, tiny_model_dir, capsys):
    ckpt = tmp_path / "run" / "sft" / "checkpoints" / "checkpoint-1"
    shutil.copytree(tiny_model_dir, ckpt, ignore=shutil.ignore_patterns("*.safetensors"))
    (ckpt / "checkpoint.complete").write_text("{}")
    (ckpt / "latest").write_text("global_step1")
    marker = tmp_path / "payload-ran"
    _crafted(ckpt / "global_step1", marker, sharded=False)
    code = main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and not marker.exists() and not (tmp_path / "out").exists()
    assert len(errors) == 1 and errors[0].startswith(f"error: {ckpt / 'global_step1'}: {REFUSED}")
