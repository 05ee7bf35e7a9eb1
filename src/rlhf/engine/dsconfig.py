"""DeepSpeed configs and HF Trainer arguments: the one place batch sizes, ZeRO stage, offload, dtype and
optimizer become DeepSpeed keys (`ds_config`; `role_config` per PPO model; `trainer_ds_config` for the
Trainer stages, a user's JSON fitted to the machine), ZeRO's bucket sizes from the model's hidden size,
the compiled optimizer ops a run would load, and the TrainingArguments keys (`trainer_kwargs`)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.config import DeepSpeedCfg, PipelineConfig, TrainCfg, ZeroRoleCfg
from rlhf.engine import ranks
from rlhf.errors import ConfigError

if TYPE_CHECKING:
    import torch

SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder.NAME


def uses_torch_adam(ds: DeepSpeedCfg) -> bool:
    """Whether DeepSpeed builds torch's AdamW (true unless `deepspeed.torch_adam: false`)."""
    # DeepSpeed's own Adam kernels (FusedAdam on the GPU, CPU Adam with offload) are compiled at first use:
    # about a minute per fresh machine, and a failed run on an image without nvcc or a C++ compiler.
    # torch's AdamW needs no build and runs as one fused kernel on the GPU, so it is the default.
    return ds.torch_adam is not False


def _adam_params(ds: DeepSpeedCfg, *, offloaded: bool) -> dict[str, Any]:
    """The `optimizer.params` keys that pick torch's AdamW (`torch_adam`) or DeepSpeed's compiled one.

    DeepSpeed passes the other params on to `torch.optim.AdamW`, so `fused` runs torch's single-kernel
    step where the optimizer states live on the GPU (not offloaded)."""
    params: dict[str, Any] = {"torch_adam": uses_torch_adam(ds)}
    if params["torch_adam"] and ranks.cuda_available() and not offloaded:
        params["fused"] = True
    return params


def _timers_off() -> dict[str, Any]:
    """The `timers` block that turns DeepSpeed's throughput timer off (a new dict: configs get edited)."""
    # DeepSpeed's throughput timer synchronizes the device at the start of each forward once an engine has
    # taken two optimizer steps (runtime/engine.py `_forward_prologue`, utils/timer.py): that stalls every
    # step, and a synchronize inside a CUDA-graph capture raises. Nothing here reads the timer.
    return {"throughput": {"enabled": False}}


def hidden_size_of(config) -> int:
    """The hidden size transformers' "auto" DeepSpeed keys use: `hidden_size`, else the largest of
    `hidden_sizes`, else the same from `text_config` (multimodal models)."""
    from rlhf.errors import ModelError

    for conf in (config, getattr(config, "text_config", None)):
        if getattr(conf, "hidden_size", None):
            return int(conf.hidden_size)
        if getattr(conf, "hidden_sizes", None):
            return int(max(conf.hidden_sizes))
    raise ModelError(f"{type(config).__name__}: the model's config has neither hidden_size nor hidden_sizes, "
                     "which size DeepSpeed's ZeRO buckets; set deepspeed.enabled: false to run it without DeepSpeed")


def model_hidden_size(model) -> int:
    """`hidden_size_of` the config of `model` or of the first submodule that has one (PPO's `ScalarHead`
    wraps a classifier)."""
    from rlhf.errors import ModelError

    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            return hidden_size_of(config)
    raise ModelError(f"{type(model).__name__}: no module of the model has a config to size DeepSpeed's ZeRO "
                     "buckets from; set deepspeed.enabled: false to run it without DeepSpeed")


def bucket_sizes(hidden_size: int | str, zero_stage: int) -> dict[str, int | str]:
    """ZeRO's bucket keys for a model of `hidden_size`, by transformers' "auto" rule: a gradient reduce
    bucket of hidden^2 elements; under ZeRO-3 parameters are prefetched up to 0.9 hidden^2 elements and
    those under 10 hidden elements stay gathered; ZeRO-1/2 all-gather the updated weights in chunks of
    hidden^2 (even: DeepSpeed asserts 2-element alignment). Left unset, DeepSpeed allocates a 5e8-element
    reduce bucket (0.93 GiB in bf16) per trained engine, whatever the model.

    `hidden_size="auto"` leaves the three keys transformers fills from the model to the HF Trainer; it does
    not fill the all-gather bucket, which allocates nothing (it gathers into the flat weights in place).
    """
    if hidden_size == "auto":
        stage3 = {"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}
        return {"reduce_bucket_size": "auto", **(stage3 if zero_stage == 3 else {})}
    square = int(hidden_size) * int(hidden_size)
    sizes: dict[str, int | str] = {"reduce_bucket_size": square}
    if zero_stage == 3:
        sizes["stage3_prefetch_bucket_size"] = int(0.9 * square)
        sizes["stage3_param_persistence_threshold"] = 10 * int(hidden_size)
    elif zero_stage in (1, 2):
        sizes["allgather_bucket_size"] = square + square % 2
    return sizes


def zero_section(role: ZeroRoleCfg, *, train: bool) -> dict[str, Any]:
    """The `zero_optimization` block for one model."""
    section: dict[str, Any] = {"stage": role.zero_stage}
    if role.zero_stage == 3:
        section["stage3_gather_16bit_weights_on_model_save"] = True
        if role.offload_param:
            section["offload_param"] = {"device": "cpu", "pin_memory": ranks.cuda_available()}
    if train and role.offload_optimizer and role.zero_stage > 0:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": ranks.cuda_available()}
    return section


def ds_config(ds: DeepSpeedCfg, role: ZeroRoleCfg, *, train: bool, micro_batch: int | str, grad_accum: int | str,
              hidden_size: int | str, max_grad_norm: float | str = "auto", dtype: str = "float32",
              lr: float | str = "auto", with_optimizer: bool = True) -> dict[str, Any]:
    """A DeepSpeed config dict for one model.

    `train=False` gives an inference engine (no optimizer). `with_optimizer=False` leaves the optimizer to
    the caller (the PPO loop builds its own AdamW). `hidden_size` (the model's) sizes ZeRO's buckets
    (`bucket_sizes`). Values may be "auto" for the HF Trainer to fill in. The throughput timer is off.
    """
    zero = zero_section(role, train=train)
    zero.update(bucket_sizes(hidden_size, role.zero_stage))
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "timers": _timers_off(),
    }
    if train:
        cfg["gradient_clipping"] = max_grad_norm
        if with_optimizer:
            params = {"lr": lr, "betas": "auto", "eps": "auto", "weight_decay": "auto"}
            cfg["optimizer"] = {"type": "AdamW",
                                "params": {**params, **_adam_params(ds, offloaded="offload_optimizer" in zero)}}
    return cfg


def trainer_ds_config(cfg: PipelineConfig, torch_device: torch.device) -> dict[str, Any]:
    """DeepSpeed config for a Trainer-based stage: the user's JSON file, or one built from `deepspeed`
    (bucket sizes "auto": the HF Trainer fills them from its model's hidden size). `torch_device`: the run's
    device, as in `ranks.run_dtype`."""
    ds = cfg.deepspeed
    if ds.config_file:
        path = Path(ds.config_file)
        try:
            return _fit_to_machine(json.loads(path.read_text(encoding="utf-8")), ds)
        except FileNotFoundError:
            raise ConfigError(f"{cfg.source}: deepspeed.config_file: {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    role = ZeroRoleCfg(zero_stage=ds.zero_stage, offload_param=ds.offload_param,
                       offload_optimizer=ds.offload_optimizer)
    return ds_config(ds, role, train=True, micro_batch="auto", grad_accum="auto", hidden_size="auto",
                     dtype=ranks.run_dtype(cfg, torch_device))


def _offloaded(zero: dict[str, Any]) -> bool:
    """Whether a `zero_optimization` block puts the optimizer state in CPU memory or on NVMe."""
    section = zero.get("offload_optimizer")
    return isinstance(section, dict) and section.get("device", "none") != "none"


def _fit_to_machine(ds_json: dict[str, Any], ds: DeepSpeedCfg) -> dict[str, Any]:
    """A user's DeepSpeed JSON, with what it leaves unset filled in: the throughput timer off, and torch's
    AdamW for an Adam/AdamW block unless `deepspeed.torch_adam: false` (fused where its states are on the
    GPU). Without CUDA also torch's AdamW where the file asks for DeepSpeed's (a C++ build on every fresh
    machine), and no pinned memory."""
    timers = ds_json.setdefault("timers", {})
    if isinstance(timers, dict):
        timers.setdefault("throughput", _timers_off()["throughput"])
    zero = ds_json.get("zero_optimization", {})
    optimizer = ds_json.get("optimizer")
    adam = isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() in ("adam", "adamw")
    if adam and uses_torch_adam(ds):  # DeepSpeed reads torch_adam for these two types only
        params = optimizer.setdefault("params", {})
        fused = _adam_params(ds, offloaded=_offloaded(zero)).get("fused", False)
        if not ranks.cuda_available():
            params["torch_adam"] = True
        elif params.setdefault("torch_adam", True) and fused and "foreach" not in params:  # torch: not both
            params.setdefault("fused", True)
    if ranks.cuda_available():
        return ds_json
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        if isinstance(section, dict):
            section["pin_memory"] = False
    return ds_json


def compiled_optimizer_ops(cfg: PipelineConfig, stages: list[str],
                           torch_device: torch.device | None = None) -> dict[str, str]:
    """DeepSpeed op builders whose compiled optimizer `stages` would load under DeepSpeed, each with the
    setting that asks for it; empty when every optimizer is torch's (the default: nothing to build).

    Trainer stages run the config's Adam/AdamW block: FusedAdam, or CPU Adam when it offloads the optimizer
    state. PPO hands DeepSpeed its own torch AdamW except for a role whose optimizer is offloaded, where
    DeepSpeed builds one from the config (`wrap`). Raises ConfigError for an unreadable config file.
    `torch_device`: the run's device, as in `ranks.run_dtype`."""
    ops: dict[str, str] = {}
    if any(stage != "ppo" for stage in stages):
        conf = trainer_ds_config(cfg, torch_device)
        optimizer = conf.get("optimizer")
        params = (optimizer.get("params") or {}) if isinstance(optimizer, dict) else {}
        if (isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() in ("adam", "adamw")
                and not params.get("torch_adam", False)):
            # with deepspeed.torch_adam left true, only the file's own `torch_adam: false` turns it off
            key = ("deepspeed.torch_adam: false" if not uses_torch_adam(cfg.deepspeed)
                   else f"{cfg.deepspeed.config_file}: optimizer.params.torch_adam false")
            offloaded = _offloaded(conf.get("zero_optimization", {}))
            ops["CPUAdamBuilder" if offloaded else "FusedAdamBuilder"] = key
    if "ppo" in stages and not uses_torch_adam(cfg.deepspeed):
        for role in ("actor", "critic"):
            if offloads_optimizer(cfg.deepspeed.role(role)):
                ops.setdefault("CPUAdamBuilder", f"deepspeed.torch_adam: false with the {role}'s optimizer "
                               "offloaded")
    return ops


def trainer_kwargs(cfg: PipelineConfig, train: TrainCfg, torch_device: torch.device) -> dict[str, Any]:
    """TrainingArguments keys that place the HF Trainer on CPU/GPU, plain torch or DeepSpeed, for a stage on
    `torch_device` (the run's device, `ranks.device`): the Trainer only learns whether that is the CPU."""
    on_cpu = torch_device.type == "cpu"
    dtype = ranks.run_dtype(cfg, torch_device)
    kwargs: dict[str, Any] = {
        "bf16": dtype == "bfloat16" and not on_cpu,
        "fp16": dtype == "float16" and not on_cpu,
        "ddp_backend": "gloo" if on_cpu and ranks.launched() else None,
        "seed": cfg.run.seed,
        "data_seed": cfg.run.seed,
    }
    if ranks.use_deepspeed(cfg.deepspeed):
        _require_deepspeed(cfg)
        kwargs["deepspeed"] = trainer_ds_config(cfg, torch_device)
        if on_cpu:
            skip_cpu_shm_comm()
            # With a DeepSpeed config, TrainingArguments passes no backend to accelerate, which then
            # sees one process per rank on CPU. Configure the state ourselves with gloo, and tell the
            # Trainer to use it.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            from accelerate import PartialState

            PartialState(backend="gloo")
            kwargs["accelerator_config"] = {"use_configured_state": True}
    elif on_cpu and not ranks.launched():
        kwargs["use_cpu"] = True
    return kwargs


def skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce on CPU-only machines.

    Its torch comm backend builds that C++ op on the first launch (minutes on a small machine, with both
    ranks racing to build it), and each launch then leaves 69 MB per rank of buffers in /dev/shm. Only
    DeepSpeed's inference engine uses the op; ZeRO training here goes through gloo.
    Marking the op incompatible makes the backend skip it. Call before DeepSpeed's comm is initialised.
    """
    if ranks.cuda_available():
        return
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False


def _require_deepspeed(cfg: PipelineConfig) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(f"{cfg.source}: deepspeed is on but not installed; `pip install deepspeed` "
                          "or set deepspeed.enabled: false") from None


def offloads_optimizer(role: ZeroRoleCfg) -> bool:
    """Whether DeepSpeed keeps this role's optimizer state on the CPU (ZeRO 1-3 only)."""
    return role.offload_optimizer and role.zero_stage > 0


def role_config(ds: DeepSpeedCfg, role: str, *, train: bool, micro_batch: int, grad_accum: int,
                max_grad_norm: float = 0.0, dtype: str = "float32", hidden_size: int | str = "auto") -> dict[str, Any]:
    """The DeepSpeed config of one PPO model (`role`: actor, critic, ref, reward) with its own ZeRO settings,
    and without an optimizer block (`wrap` adds what it needs). A frozen model (`train=False`) runs at stage
    3 or 0: ZeRO-1/2 shard only optimizer state and gradients, which it has none of. `hidden_size` (the
    model's, `model_hidden_size`) sizes ZeRO's buckets; "auto" leaves DeepSpeed's defaults, for a config
    that builds no engine."""
    role_cfg = ds.role(role)
    if not train:
        role_cfg = ZeroRoleCfg(zero_stage=3 if role_cfg.zero_stage == 3 else 0,
                               offload_param=role_cfg.offload_param, offload_optimizer=False)
    conf = ds_config(ds, role_cfg, train=train, micro_batch=micro_batch, grad_accum=grad_accum,
                     hidden_size=hidden_size, max_grad_norm=max_grad_norm, dtype=dtype, with_optimizer=False)
    if not train:
        conf["gradient_accumulation_steps"] = 1
    return conf


@contextlib.contextmanager
def single_process_loading():
    """Load a full, unsharded model on one rank while a ZeRO-3 Trainer is alive.

    transformers partitions every model built while a ZeRO-3 config is registered (zero.Init), which is a
    collective: a load on rank 0 alone would wait forever for the other ranks.
    """
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
