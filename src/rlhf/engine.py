"""Everything distributed: launcher detection, DeepSpeed configs, process-group setup and teardown.

This is the only module that imports deepspeed, and only inside functions, so stages and tests that
run in a plain process never load it. Two consumers:
- Trainer-based stages (SFT, reward, DPO, ORPO) call `trainer_kwargs()` for the TrainingArguments
  keys that put the HF Trainer on DeepSpeed (or plain torch) with the right backend.
- The PPO loop calls `ds_config()` per model role and `initialize()` to wrap each model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rlhf.config import DeepSpeedCfg, PipelineConfig, TrainCfg, ZeroRoleCfg
from rlhf.errors import ConfigError

log = logging.getLogger("rlhf")


# --------------------------------------------------------------------------- launcher and ranks


def launched() -> bool:
    """True when a launcher (deepspeed, torchrun, accelerate, srun wrappers) started this process."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def use_deepspeed(ds: DeepSpeedCfg) -> bool:
    """DeepSpeed is on when forced in config, or by default whenever a launcher started us."""
    return launched() if ds.enabled is None else ds.enabled


def init_distributed() -> None:
    """Initialise the default process group once, when launched with more than one rank."""
    import torch
    import torch.distributed as dist

    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if cuda_available():
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Barrier, then destroy the process group. Without it, exits race into SIGABRT on some ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- DeepSpeed configs


def _torch_adam(ds: DeepSpeedCfg) -> bool:
    # DeepSpeed's fused/CPU Adam kernels are compiled on first use (about a minute); on CPU-only
    # machines torch's AdamW is as fast at these sizes.
    return (not cuda_available()) if ds.torch_adam is None else ds.torch_adam


def zero_section(role: ZeroRoleCfg, *, train: bool) -> dict[str, Any]:
    """The `zero_optimization` block for one model."""
    section: dict[str, Any] = {"stage": role.zero_stage}
    if role.zero_stage == 3:
        section["stage3_gather_16bit_weights_on_model_save"] = True
        if role.offload_param:
            section["offload_param"] = {"device": "cpu", "pin_memory": cuda_available()}
    if train and role.offload_optimizer and role.zero_stage > 0:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda_available()}
    return section


def ds_config(ds: DeepSpeedCfg, role: ZeroRoleCfg, *, train: bool, micro_batch: int | str, grad_accum: int | str,
              max_grad_norm: float | str = "auto", dtype: str = "float32", lr: float | str = "auto",
              with_optimizer: bool = True) -> dict[str, Any]:
    """A DeepSpeed config dict for one model.

    `train=False` gives an inference engine (no optimizer). `with_optimizer=False` leaves the optimizer to
    the caller (the PPO loop builds its own AdamW). Values may be "auto" for the HF Trainer to fill in.
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero_section(role, train=train),
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train:
        cfg["gradient_clipping"] = max_grad_norm
        if with_optimizer:
            cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "betas": "auto", "eps": "auto",
                                                            "weight_decay": "auto", "torch_adam": _torch_adam(ds)}}
    return cfg


def trainer_ds_config(cfg: PipelineConfig) -> dict[str, Any]:
    """DeepSpeed config for a Trainer-based stage: the user's JSON file, or one built from `deepspeed`."""
    ds = cfg.deepspeed
    if ds.config_file:
        path = Path(ds.config_file)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{cfg.source}: deepspeed.config_file: {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    role = ZeroRoleCfg(zero_stage=ds.zero_stage, offload_param=ds.offload_param,
                       offload_optimizer=ds.offload_optimizer)
    return ds_config(ds, role, train=True, micro_batch="auto", grad_accum="auto", dtype=cfg.model.dtype)


def trainer_kwargs(cfg: PipelineConfig, train: TrainCfg) -> dict[str, Any]:
    """TrainingArguments keys that place the HF Trainer on CPU/GPU, plain torch or DeepSpeed."""
    on_cpu = cfg.run.device == "cpu" or not cuda_available()
    kwargs: dict[str, Any] = {
        "bf16": cfg.model.dtype == "bfloat16" and not on_cpu,
        "fp16": cfg.model.dtype == "float16" and not on_cpu,
        "ddp_backend": "gloo" if on_cpu else None,
        "seed": cfg.run.seed,
        "data_seed": cfg.run.seed,
    }
    if use_deepspeed(cfg.deepspeed):
        _require_deepspeed(cfg)
        kwargs["deepspeed"] = trainer_ds_config(cfg)
        if on_cpu:
            # With a DeepSpeed config, TrainingArguments passes no backend to accelerate, which then
            # sees one process per rank on CPU. Configure the state ourselves with gloo, and tell the
            # Trainer to use it.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            from accelerate import PartialState

            PartialState(backend="gloo")
            kwargs["accelerator_config"] = {"use_configured_state": True}
    elif on_cpu and not launched():
        kwargs["use_cpu"] = True
    return kwargs


def _require_deepspeed(cfg: PipelineConfig) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(f"{cfg.source}: deepspeed is on but not installed; `pip install deepspeed` "
                          "or set deepspeed.enabled: false") from None


def initialize(model, ds_cfg: dict[str, Any], optimizer=None, lr_scheduler=None):
    """Wrap one model in a DeepSpeed engine (PPO). Returns the engine."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      config=ds_cfg, dist_init_required=False)
    return engine
