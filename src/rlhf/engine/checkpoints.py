"""Engine checkpoints: a trained PPO engine's weights, optimizer and scheduler saved and restored
(`save_engine`, `load_engine`), and a DeepSpeed checkpoint's full state dict read without an engine
(`deepspeed_state_dict`) through torch's weights-only unpickler, so a checkpoint someone else made cannot
run code here."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from rlhf.engine import training
from rlhf.errors import ConfigError


def save_engine(eng, path: Path) -> None:
    """Weights, optimizer and scheduler of a trained engine under `path` (collective under DeepSpeed).

    Plain: model.safetensors, optimizer.pt and scheduler.pt (tensors and plain types only, so they load
    with `weights_only=True`). DeepSpeed: its own sharded checkpoint layout, tag `state`.
    """
    import torch
    from safetensors.torch import save_model

    path = Path(path)
    if not isinstance(eng, training.PlainEngine):
        eng.save_checkpoint(str(path), tag="state", save_latest=False)
        return
    path.mkdir(parents=True, exist_ok=True)
    with eng.full_precision():
        save_model(eng.module, str(path / "model.safetensors"))
    torch.save(eng.optimizer.state_dict(), path / "optimizer.pt")
    if eng.lr_scheduler is not None:
        torch.save(eng.lr_scheduler.state_dict(), path / "scheduler.pt")


def load_engine(eng, path: Path) -> None:
    """Restore what `save_engine` wrote."""
    import torch
    from safetensors.torch import load_model

    path = Path(path)
    if not isinstance(eng, training.PlainEngine):
        loaded, _ = eng.load_checkpoint(str(path), tag="state", load_optimizer_states=True,
                                        load_lr_scheduler_states=True)
        if loaded is None:
            raise ConfigError(f"{path}: not a readable DeepSpeed checkpoint")
        return
    with eng.full_precision():
        load_model(eng.module, str(path / "model.safetensors"))
    eng.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if eng.lr_scheduler is not None and (path / "scheduler.pt").exists():
        eng.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))


def deepspeed_state_dict(path: Path, tag: str | None = None) -> dict:
    """The full module state dict (CPU tensors) of a DeepSpeed checkpoint under `path`, without an engine.

    `tag`: the checkpoint's sub-dir (`state` for what `save_engine` writes; None reads the `latest` file the
    HF Trainer writes). ZeRO 1-3: the fp32 master weights merged from every rank's shards by DeepSpeed's
    `zero_to_fp32` (frozen parameters included); ZeRO-0: the module state the model file holds. Both read
    DeepSpeed's `*_states.pt` files with torch's weights-only unpickler (`_weights_only_loads`), so a
    checkpoint someone else made cannot run code here.
    """
    import torch

    path = Path(path)
    if tag is None:
        latest = path / "latest"
        tag = latest.read_text(encoding="utf-8").strip() if latest.is_file() else ""
    ds_dir = path / tag
    if not tag or not ds_dir.is_dir():
        raise ConfigError(f"{path}: no DeepSpeed checkpoint here (no `latest` file or tag dir)")
    if any(ds_dir.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # it prints progress; stdout may carry a command's output
        with _weights_only_loads(ds_dir), contextlib.redirect_stdout(sys.stderr):
            return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    model_file = ds_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ConfigError(f"{ds_dir}: no model states file (mp_rank_00_model_states.pt); the checkpoint is incomplete")
    with _weights_only_loads(ds_dir):
        return torch.load(model_file, map_location="cpu", weights_only=True)["module"]


# The classes DeepSpeed pickles into its ZeRO checkpoints besides tensors and plain types (found by saving
# ZeRO 0-3 checkpoints in fp32, bf16 and fp16 with DeepSpeed 0.19 and listing what torch's weights-only
# unpickler refuses): the loss scalers, the ZeRO stage and the fragment addresses of ZeRO-1/2.
_DEEPSPEED_PICKLED = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                      ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address"))
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it on every call


@contextlib.contextmanager
def _weights_only_loads(ds_dir: Path):
    """Every torch.load in the block unpickles tensors, plain types and `_DEEPSPEED_PICKLED` only, whatever
    its caller passes (DeepSpeed's `zero_to_fp32` passes weights_only=False). Any other pickled object
    (whose unpickling could run code) is refused before it is built: an ArtifactError naming it."""
    import importlib
    import pickle
    import re

    import torch

    from rlhf.errors import ArtifactError

    try:
        allowed = [getattr(importlib.import_module(module), name) for module, name in _DEEPSPEED_PICKLED]
    except (ImportError, AttributeError):  # no DeepSpeed here: a ZeRO-0 model file needs none of them
        allowed = []
    saved = {key: os.environ.pop(key, None) for key in (_FORCE_WEIGHTS_ONLY, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else "object"
        raise ArtifactError(f"{ds_dir}: a checkpoint file holds a pickled {what}, neither a tensor nor a type "
                            "DeepSpeed saves, so it was not loaded (unpickling it could run code); export "
                            "checkpoints written by the rlhf stages, or, only if you trust whoever made this one, "
                            "convert it with DeepSpeed's zero_to_fp32.py") from None
    finally:
        os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        os.environ.update({key: value for key, value in saved.items() if value is not None})
