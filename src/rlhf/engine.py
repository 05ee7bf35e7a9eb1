"""Everything distributed: launcher detection, DeepSpeed configs, process-group setup and teardown.

This is the only module that imports deepspeed, and only inside functions, so stages and tests that
run in a plain process never load it. Two consumers:
- Trainer-based stages (SFT, reward, DPO, ORPO) call `trainer_kwargs()` for the TrainingArguments
  keys that put the HF Trainer on DeepSpeed (or plain torch) with the right backend.
- The PPO loop calls `ds_config()` per model role and `initialize()` to wrap each model.

Every collective goes through the helpers at the bottom, and they do nothing at world size 1. With
`RLHF_COLLECTIVES_ALWAYS=1` they run whenever a process group exists, even of one rank: a check on a
one-GPU machine (launched with NUM_GPUS=1) then sends each of them through NCCL (GPU tensors) or gloo
(host-side values), as a multi-GPU run does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rlhf.config import DeepSpeedCfg, PipelineConfig, TrainCfg, ZeroRoleCfg
from rlhf.errors import ConfigError

log = logging.getLogger("rlhf")

SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder.NAME


# --------------------------------------------------------------------------- launcher and ranks


def launched() -> bool:
    """True when a launcher (deepspeed, torchrun, accelerate, srun wrappers) started this process.

    A ConfigError for one of several tasks that srun started with no launcher around them (`srun
    --ntasks-per-node=8 python -m rlhf.cli ...`): with no RANK/LOCAL_RANK/WORLD_SIZE, each task would be a
    run of its own, all racing for one stage dir.
    """
    if "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    tasks, task = _srun_tasks()
    if tasks > 1:
        raise ConfigError(f"srun started this process as task {task} of {tasks} (SLURM_PROCID={task}) with no "
                          "launcher, so every task would run on its own, all racing for one stage dir: start "
                          "one task per node with stages/slurm/stage.sbatch, which runs a launcher for the node's "
                          "GPUs (stages/README.md)")
    return False


def _srun_tasks() -> tuple[int, int]:
    """(tasks, this task's SLURM_PROCID) of the srun step this process is a task of; (1, 0) outside one,
    and in one task per node of `stages/slurm/stage.sbatch` (NNODES set: lib.sh's launcher runs the ranks,
    and the plain commands there, such as `rlhf preflight`, are one process per node by design)."""
    env = os.environ
    if "SLURM_PROCID" not in env or "NNODES" in env:
        return 1, 0

    def number(key: str) -> int:
        value = env.get(key, "").strip()
        return int(value) if value.isdecimal() else 0

    task = number("SLURM_PROCID")
    if "SLURM_STEP_NUM_TASKS" in env:  # set by srun alone
        return max(number("SLURM_STEP_NUM_TASKS"), 1), task
    # A batch script sees SLURM_NTASKS (what the job asked for) and SLURM_PROCID=0 too, but it is one process:
    # only a task past the first (of the job, or on this node) shows that srun started several.
    if task > 0 or number("SLURM_LOCALID") > 0:
        return max(number("SLURM_NTASKS"), task + 1), task
    return 1, 0


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
    """The process group's backends: on CUDA machines NCCL for GPU tensors and gloo for CPU ones, so a
    collective on a CPU tensor (a flag, a step number, a file chunk) still has a backend."""
    return "cpu:gloo,cuda:nccl" if cuda_available() else "gloo"


def device(run_device: str = "auto"):
    """The run's device (one rule for every stage): `cuda:<LOCAL_RANK>` when CUDA is present and
    `run.device` is not `cpu`, else the CPU.

    That is the GPU DeepSpeed's engine takes as well (it calls `set_device(LOCAL_RANK)`); the deepspeed
    launcher shows all ranks of a node the node's GPUs (`CUDA_VISIBLE_DEVICES=0,...,N-1`), and torchrun
    leaves them all visible, so local rank r is visible GPU r. Also accepted: `CUDA_VISIBLE_DEVICES`
    naming one device (a scheduler that binds each rank to its own GPU) gives `cuda:0` at any local rank;
    plain torch runs there, while DeepSpeed's engine still asks for `cuda:<LOCAL_RANK>` and fails, so
    DeepSpeed needs one launcher per node. Any other local rank at or past the visible GPU count is a
    ConfigError: two ranks would share a GPU (or DeepSpeed would pick another one than this).
    """
    import torch

    if run_device == "cpu" or not cuda_available():
        return torch.device("cpu")
    visible, index = torch.cuda.device_count(), local_rank()
    if index < visible:
        return torch.device("cuda", index)
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible == 1 and shown is not None and len([d for d in shown.split(",") if d.strip()]) == 1:
        return torch.device("cuda", 0)  # this rank's own GPU, bound by the scheduler
    raise ConfigError(f"LOCAL_RANK={index} but this process sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                      f"{shown if shown is not None else 'unset'}): launch one rank per visible GPU "
                      f"(e.g. NUM_GPUS={visible})")


def run_dtype(cfg: PipelineConfig) -> str:
    """`model.dtype` with `auto` resolved: bfloat16 on a GPU that has it, else float32."""
    import torch

    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    on_gpu = device(cfg.run.device).type == "cuda"
    return "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32"


def trained_load_dtype(cfg: PipelineConfig) -> str:
    """The dtype a model that will be trained is loaded in. DeepSpeed's bf16 and fp16 modes keep fp32 master
    weights of what it trains, so there the run's dtype; without DeepSpeed, float32: the fp32 weights become
    the masters (`MasterWeights` in PPO's plain engine; the HF Trainer computes under autocast). Frozen
    models load in `run_dtype`."""
    return run_dtype(cfg) if use_deepspeed(cfg.deepspeed) else "float32"


def model_device(model) -> str:
    """Where a model's weights live ("cuda:0", "cpu"; under ZeRO-3 the device of this rank's shard)."""
    for param in model.parameters():
        return str(param.device)
    return "none"


def compute_device(eng) -> str:
    """Where an engine (PPO's, or a Trainer's DeepSpeed engine) computes: DeepSpeed's accelerator device,
    also when ZeRO-3 keeps the parameters in CPU memory (`offload_param`); else where the weights are."""
    if isinstance(eng, PlainEngine):
        return model_device(eng.module)
    device = getattr(eng, "device", None)
    return str(device) if device is not None else model_device(getattr(eng, "module", eng))


def trainer_device(trainer) -> str:
    """Where an HF Trainer's model computed: its DeepSpeed engine's device, else its weights' device."""
    ds_engine = getattr(trainer, "deepspeed", None)
    return compute_device(ds_engine) if ds_engine is not None else model_device(trainer.model)


def use_deepspeed(ds: DeepSpeedCfg) -> bool:
    """DeepSpeed is on when forced in config, or by default whenever a launcher started us."""
    return launched() if ds.enabled is None else ds.enabled


def init_distributed(timeout_s: float | None = None) -> None:
    """Initialise the default process group once, when launched with more than one rank.

    `timeout_s` (`run.collective_timeout_s`; None: its default) bounds how long any rank waits in one
    collective or barrier of this group, under gloo and NCCL alike, and how long the ranks wait for each
    other to join it. It has to outlast the longest wait of a healthy run: the other ranks sit at a barrier
    while rank 0 writes a large `final/`, and while node-local disks receive their copies (`rlhf.replicate`).
    A group that already exists (made by another library) keeps its own timeout.
    """
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from rlhf import failwatch
    from rlhf.config import RunCfg

    if not launched():
        return
    if not (dist.is_available() and dist.is_initialized()):
        if cuda_available():
            torch.cuda.set_device(device())
        # Without a timeout torch picks one per backend string (30 min for this one, 10 for plain NCCL):
        # one setting, stated in the config, for both backends of the group.
        seconds = RunCfg.collective_timeout_s if timeout_s is None else timeout_s
        dist.init_process_group(backend=backend(), timeout=timedelta(seconds=seconds))
    failwatch.start(store(), rank())


def probe_links(record: Any, timeout_s: float) -> tuple[list[Any], dict[str, float]]:
    """Every rank's `record` (rank order) and the milliseconds of one small all-reduce through each transport
    of the process group: host memory (gloo) always, GPU memory (NCCL) on CUDA machines. Each transport gets
    a group of its own whose collectives give up after `timeout_s` (the default group waits
    `run.collective_timeout_s`, 30 minutes): a rank that never answers is named by gloo's monitored barrier
    (a RuntimeError listing the missing ranks); an NCCL link that hangs ends the rank through NCCL's own
    watchdog. One process, no group: ([record], {})."""
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [record], {}
    timeout = timedelta(seconds=timeout_s)
    took: dict[str, float] = {}
    host = dist.new_group(backend="gloo", timeout=timeout)
    dist.monitored_barrier(group=host, timeout=timeout, wait_all_ranks=True)
    start = time.perf_counter()
    dist.all_reduce(torch.ones(1), group=host)
    took["gloo"] = (time.perf_counter() - start) * 1e3
    if cuda_available():
        gpu = dist.new_group(backend="nccl", timeout=timeout)
        ones = torch.ones(1, device=device())
        dist.all_reduce(ones, group=gpu)  # the first call also builds the communicator: timed apart
        torch.cuda.synchronize()
        start = time.perf_counter()
        dist.all_reduce(ones, group=gpu)
        torch.cuda.synchronize()
        took["nccl"] = (time.perf_counter() - start) * 1e3
        dist.destroy_process_group(gpu)
    records: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record, group=host)
    dist.destroy_process_group(host)
    return records, took


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


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup(wait_for_others: bool = True) -> None:
    """Barrier, then destroy the process group. Without it, exits race into SIGABRT on some ranks.

    After a failure on this rank, skip the barrier: the launcher stops the other ranks of this node, and
    the failure watcher (`failwatch`) those of other nodes.
    """
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    from rlhf import failwatch

    initialized = dist.is_available() and dist.is_initialized()
    try:
        if initialized and wait_for_others:
            dist.barrier()  # the watcher still runs: a rank that fails before reaching it stops us
    finally:
        failwatch.stop()
        if initialized:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- DeepSpeed configs


def _torch_adam(ds: DeepSpeedCfg) -> bool:
    """Whether DeepSpeed builds torch's AdamW (true unless `deepspeed.torch_adam: false`)."""
    # DeepSpeed's own Adam kernels (FusedAdam on the GPU, CPU Adam with offload) are compiled at first use:
    # about a minute per fresh machine, and a failed run on an image without nvcc or a C++ compiler.
    # torch's AdamW needs no build and runs as one fused kernel on the GPU, so it is the default.
    return ds.torch_adam is not False


def _adam_params(ds: DeepSpeedCfg, *, offloaded: bool) -> dict[str, Any]:
    """The `optimizer.params` keys that pick torch's AdamW (`torch_adam`) or DeepSpeed's compiled one.

    DeepSpeed passes the other params on to `torch.optim.AdamW`, so `fused` runs torch's single-kernel
    step where the optimizer states live on the GPU (not offloaded)."""
    params: dict[str, Any] = {"torch_adam": _torch_adam(ds)}
    if params["torch_adam"] and cuda_available() and not offloaded:
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
            section["offload_param"] = {"device": "cpu", "pin_memory": cuda_available()}
    if train and role.offload_optimizer and role.zero_stage > 0:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda_available()}
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


def trainer_ds_config(cfg: PipelineConfig) -> dict[str, Any]:
    """DeepSpeed config for a Trainer-based stage: the user's JSON file, or one built from `deepspeed`
    (bucket sizes "auto": the HF Trainer fills them from its model's hidden size)."""
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
                     dtype=run_dtype(cfg))


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
    if adam and _torch_adam(ds):  # DeepSpeed reads torch_adam for these two types only
        params = optimizer.setdefault("params", {})
        fused = _adam_params(ds, offloaded=_offloaded(zero)).get("fused", False)
        if not cuda_available():
            params["torch_adam"] = True
        elif params.setdefault("torch_adam", True) and fused and "foreach" not in params:  # torch: not both
            params.setdefault("fused", True)
    if cuda_available():
        return ds_json
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        if isinstance(section, dict):
            section["pin_memory"] = False
    return ds_json


def compiled_optimizer_ops(cfg: PipelineConfig, stages: list[str]) -> dict[str, str]:
    """DeepSpeed op builders whose compiled optimizer `stages` would load under DeepSpeed, each with the
    setting that asks for it; empty when every optimizer is torch's (the default: nothing to build).

    Trainer stages run the config's Adam/AdamW block: FusedAdam, or CPU Adam when it offloads the optimizer
    state. PPO hands DeepSpeed its own torch AdamW except for a role whose optimizer is offloaded, where
    DeepSpeed builds one from the config (`wrap`). Raises ConfigError for an unreadable config file."""
    ops: dict[str, str] = {}
    if any(stage != "ppo" for stage in stages):
        conf = trainer_ds_config(cfg)
        optimizer = conf.get("optimizer")
        params = (optimizer.get("params") or {}) if isinstance(optimizer, dict) else {}
        if (isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() in ("adam", "adamw")
                and not params.get("torch_adam", False)):
            # with deepspeed.torch_adam left true, only the file's own `torch_adam: false` turns it off
            key = ("deepspeed.torch_adam: false" if not _torch_adam(cfg.deepspeed)
                   else f"{cfg.deepspeed.config_file}: optimizer.params.torch_adam false")
            offloaded = _offloaded(conf.get("zero_optimization", {}))
            ops["CPUAdamBuilder" if offloaded else "FusedAdamBuilder"] = key
    if "ppo" in stages and not _torch_adam(cfg.deepspeed):
        for role in ("actor", "critic"):
            if offloads_optimizer(cfg.deepspeed.role(role)):
                ops.setdefault("CPUAdamBuilder", f"deepspeed.torch_adam: false with the {role}'s optimizer "
                               "offloaded")
    return ops


def trainer_kwargs(cfg: PipelineConfig, train: TrainCfg) -> dict[str, Any]:
    """TrainingArguments keys that place the HF Trainer on CPU/GPU, plain torch or DeepSpeed."""
    on_cpu = cfg.run.device == "cpu" or not cuda_available()
    kwargs: dict[str, Any] = {
        "bf16": run_dtype(cfg) == "bfloat16" and not on_cpu,
        "fp16": run_dtype(cfg) == "float16" and not on_cpu,
        "ddp_backend": "gloo" if on_cpu and launched() else None,
        "seed": cfg.run.seed,
        "data_seed": cfg.run.seed,
    }
    if use_deepspeed(cfg.deepspeed):
        _require_deepspeed(cfg)
        kwargs["deepspeed"] = trainer_ds_config(cfg)
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
    elif on_cpu and not launched():
        kwargs["use_cpu"] = True
    return kwargs


def skip_cpu_shm_comm() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce on CPU-only machines.

    Its torch comm backend builds that C++ op on the first launch (minutes on a small machine, with both
    ranks racing to build it), and each launch then leaves 69 MB per rank of buffers in /dev/shm. Only
    DeepSpeed's inference engine uses the op; ZeRO training here goes through gloo.
    Marking the op incompatible makes the backend skip it. Call before DeepSpeed's comm is initialised.
    """
    if cuda_available():
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


def initialize(model, ds_cfg: dict[str, Any], optimizer=None, lr_scheduler=None, model_parameters=None):
    """Wrap one model in a DeepSpeed engine (PPO). Returns the engine. `lr_scheduler` may be a callable
    that DeepSpeed applies to the optimizer it builds."""
    import deepspeed

    skip_cpu_shm_comm()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      model_parameters=model_parameters, config=ds_cfg, dist_init_required=False)
    return engine


# --------------------------------------------------------------------------- PPO engines (own loop)


class Engine(Protocol):
    """What the PPO loop uses of an engine: a DeepSpeed engine, or a `PlainEngine` with the same surface."""

    module: Any
    optimizer: Any

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def backward(self, loss: Any, scale_wrt_gas: bool = True) -> Any: ...

    def step(self) -> Any: ...

    def is_gradient_accumulation_boundary(self) -> bool: ...

    def zero_optimization_stage(self) -> int: ...


@dataclass(frozen=True)
class AdamW:
    """Hyperparameters of a trained PPO engine's AdamW (its schedule is constant)."""

    lr: float
    eps: float = 1e-8
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)

    def build(self, params, *, fused: bool = False):
        import torch

        kwargs = {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay, "betas": self.betas}
        if fused:
            try:  # one kernel per step instead of a loop over tensors (CPU and CUDA)
                return torch.optim.AdamW(params, fused=True, **kwargs)
            except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
                pass
        return torch.optim.AdamW(params, **kwargs)

    def ds_section(self, torch_adam: bool) -> dict[str, Any]:
        """The DeepSpeed config's `optimizer` block for these values."""
        return {"type": "AdamW", "params": {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay,
                                            "betas": list(self.betas), "torch_adam": torch_adam}}


def constant_schedule(optimizer):
    import torch

    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


class MasterWeights:
    """fp32 master copies of a half-precision model's trained parameters, as DeepSpeed keeps them in its
    bf16 and fp16 modes. A bf16 weight updated in place loses every step smaller than ~1/256 of its size
    (at PPO's learning rates, nearly every step).

    The module computes in its half dtype. Each backward's gradient is added into its master's fp32 `.grad`
    as soon as it is accumulated, and the module's own is freed, so accumulation over micro-batches is fp32
    too; the optimizer steps the masters, and `copy_to_module` rounds them into the module's weights in place
    (the storage keeps its address: a captured CUDA graph of the module stays valid).
    """

    def __init__(self, params, dtype):
        import torch

        self.params = list(params)
        self.masters = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
        for p in self.params:
            p.data = p.data.to(dtype)
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate_into(m))
                       for p, m in zip(self.params, self.masters, strict=True)]

    @staticmethod
    def _accumulate_into(master):
        def hook(param) -> None:
            if master.grad is None:
                master.grad = param.grad.float()
            else:
                master.grad.add_(param.grad)
            param.grad = None

        return hook

    def copy_to_module(self) -> None:
        import torch

        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                p.copy_(m)

    @contextlib.contextmanager
    def in_module(self):
        """The masters in place of the module's trained weights for the block (to save or load them);
        after it the module holds its half-precision weights again, rounded from the masters."""
        held = [p.data for p in self.params]
        for p, m in zip(self.params, self.masters, strict=True):
            p.data = m.data
        try:
            yield
        finally:
            for p, data in zip(self.params, held, strict=True):
                p.data = data
            self.copy_to_module()


class PlainEngine:
    """The plain-torch stand-in for a DeepSpeed engine, with the surface the PPO loop uses.

    `backward(loss)` accumulates gradients; `step()` counts micro-batches and, at every `grad_accum`-th
    one (the accumulation boundary), averages the gradients over ranks (when a launcher started several),
    clips the gradient norm, steps optimizer and scheduler and zeroes the gradients, as DeepSpeed does.
    With `masters` (a half-precision model) the optimizer holds the fp32 masters and every step is
    rounded into the module's weights. With several ranks the parameters start as rank 0's (a newly
    initialised head differs per rank), so the ranks stay one model, as under DDP.
    """

    def __init__(self, model, optimizer=None, lr_scheduler=None, *, grad_accum: int = 1, max_grad_norm: float = 0.0,
                 masters: MasterWeights | None = None):
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.grad_accum, self.max_grad_norm, self.masters = grad_accum, max_grad_norm, masters
        self.micro_steps, self.grad_norm, self._synced = 0, None, False
        broadcast_parameters(model)
        if masters is not None:  # rank 0's weights, rounded: the masters must start from what ranks share
            for master in masters.masters:
                broadcast(master.data)
            masters.copy_to_module()

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def eval(self) -> None:
        self.module.eval()

    def zero_optimization_stage(self) -> int:
        return 0

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss, scale_wrt_gas: bool = True) -> None:
        """As DeepSpeed's: the loss is divided by `grad_accum` unless `scale_wrt_gas=False`."""
        (loss / self.grad_accum if scale_wrt_gas else loss).backward()

    def step(self) -> None:
        import torch

        if self.optimizer is None:
            raise RuntimeError("step() on an inference engine (no optimizer)")
        if self.is_gradient_accumulation_boundary():
            params = self.sync_gradients()
            if self.max_grad_norm > 0:
                # a device tensor, read on the host only when the stats are (`grad_norm`)
                self.grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
            if self.masters is not None:
                self.masters.copy_to_module()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._synced = False
        self.micro_steps += 1

    def sync_gradients(self) -> list:
        """Average the trained parameters' gradients over ranks, once per accumulation boundary (before
        any check of their values, so every rank sees the same ones). Returns the optimizer's parameters
        (the fp32 masters, where the engine keeps them)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not self._synced:
            average_gradients(params)
            self._synced = True
        return params

    def full_precision(self):
        """Context manager: the module with its trained weights at full precision (the fp32 masters, where
        the engine keeps them) for the block, to save or load them."""
        return self.masters.in_module() if self.masters is not None else contextlib.nullcontext()


def offloads_optimizer(role: ZeroRoleCfg) -> bool:
    """Whether DeepSpeed keeps this role's optimizer state on the CPU (ZeRO 1-3 only)."""
    return role.offload_optimizer and role.zero_stage > 0


def _set_ds_accelerator(device) -> None:
    """DeepSpeed's accelerator for a run on `device` (it is chosen once, when DeepSpeed is first imported)."""
    on_cpu = device is None or getattr(device, "type", str(device)) == "cpu"
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if on_cpu or not cuda_available() else "cuda")


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
def partitioned_loading(ds: DeepSpeedCfg, role: str, *, train: bool, micro_batch: int, grad_accum: int,
                        dtype: str, device=None):
    """Around loading one PPO model. Under DeepSpeed with the role at ZeRO-3, transformers builds the model
    already partitioned over the ranks (DeepSpeed's zero.Init, from this role's config) and each rank keeps
    only its shard, where a plain load would hold the whole model on every rank until `wrap` shards it
    (for an 8B PPO run on 8 ranks, four full models per rank). Collective then: every rank loads.
    Elsewhere it does nothing."""
    if not use_deepspeed(ds) or ds.role(role).zero_stage != 3:
        yield
        return
    _set_ds_accelerator(device)
    skip_cpu_shm_comm()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    conf = role_config(ds, role, train=train, micro_batch=micro_batch, grad_accum=grad_accum, dtype=dtype)
    registered = HfDeepSpeedConfig(conf)  # registers itself (by weak reference) for from_pretrained
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del registered


def wrap(model, ds: DeepSpeedCfg, role: str, *, adamw: AdamW | None = None, micro_batch: int = 1,
         grad_accum: int = 1, max_grad_norm: float = 0.0, dtype: str = "float32", device=None):
    """One PPO model as an engine: DeepSpeed with the role's own ZeRO settings when DeepSpeed is on,
    else a `PlainEngine` on `device`. Without `adamw` the model is inference-only (no optimizer state).

    The optimizer is trained parameters only, with a constant schedule. Under DeepSpeed with the role's
    optimizer offloaded, DeepSpeed builds it from the config (torch's AdamW, or its CPU Adam kernel with
    `deepspeed.torch_adam: false`), since it refuses a client optimizer with offload; otherwise it is torch's
    AdamW (fused where the device has the kernel, for the plain engine).

    Both engines expose `.module`, `.backward(loss)`, `.step()`, `.train()`, `.eval()` and
    `.zero_optimization_stage()`, so the loop has one code path.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not use_deepspeed(ds):
        if device is not None:
            model.to(device)
        if adamw is None:
            return PlainEngine(model)
        masters = None
        if dtype != "float32":  # `model` came in float32 (`trained_load_dtype`); it computes in `dtype`
            if dtype == "float16":
                raise ConfigError("model.dtype: float16 trains without loss scaling on the plain engine (DeepSpeed "
                                  "off), so small gradients vanish; use bfloat16 or float32, or turn DeepSpeed on "
                                  "(deepspeed.enabled: true), whose fp16 mode scales the loss")
            import torch

            masters = MasterWeights(params, getattr(torch, dtype))
        optimizer = adamw.build(masters.masters if masters else params, fused=True)
        return PlainEngine(model, optimizer, constant_schedule(optimizer), grad_accum=grad_accum,
                           max_grad_norm=max_grad_norm, masters=masters)
    _set_ds_accelerator(device)
    train = adamw is not None
    conf = role_config(ds, role, train=train, micro_batch=micro_batch, grad_accum=grad_accum,
                       max_grad_norm=max_grad_norm, dtype=dtype, hidden_size=model_hidden_size(model))
    if not train:
        return initialize(model, conf)
    role_cfg = ds.role(role)
    if offloads_optimizer(role_cfg):
        conf["optimizer"] = adamw.ds_section(_torch_adam(ds))
        conf["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW on the CPU partition, when torch_adam
        return initialize(model, conf, model_parameters=params, lr_scheduler=constant_schedule)
    on_gpu = device is not None and getattr(device, "type", str(device)).startswith("cuda")
    optimizer = adamw.build(params, fused=on_gpu)  # torch's fused kernel on the GPU: no compiled DeepSpeed op
    return initialize(model, conf, optimizer=optimizer, lr_scheduler=constant_schedule(optimizer))


def step_or_skip(eng, skip_nonfinite: bool = False) -> bool:
    """`eng.step()`. With `skip_nonfinite`, an accumulation boundary whose gradients hold NaN/inf applies no
    update; returns True when that happened. Where gradients live on the parameters (PlainEngine, ZeRO-0)
    they are checked and discarded here (after the all-reduce over ranks, so every rank agrees); under ZeRO 1-3
    DeepSpeed's own check discards the step and counts it in `skipped_steps`."""
    if not skip_nonfinite:
        eng.step()
        return False
    from rlhf.guards import drop_nonfinite_grads

    boundary = eng.is_gradient_accumulation_boundary()
    params = eng.module.parameters()
    if boundary and isinstance(eng, PlainEngine):
        params = eng.sync_gradients()  # where the gradients are: the fp32 masters, when the engine keeps them
    dropped = boundary and eng.zero_optimization_stage() == 0 and drop_nonfinite_grads(params)
    before = int(getattr(eng, "skipped_steps", 0))
    eng.step()
    return dropped or int(getattr(eng, "skipped_steps", 0)) > before


def grad_norm(eng) -> float | None:
    """Gradient norm of the last optimizer step, before clipping (None when unknown)."""
    if isinstance(eng, PlainEngine):
        return None if eng.grad_norm is None else float(eng.grad_norm)
    value = eng.get_global_grad_norm()
    return None if value is None else float(value)


def is_zero3(eng) -> bool:
    return eng.zero_optimization_stage() == 3


def gathered_for_generation(eng):
    """Context manager: under ZeRO-3, gather all of a trained engine's parameters once and lift the
    per-layer fetch/release hooks for the whole block (a rollout), instead of gathering layer by
    layer for every generated token. Elsewhere it does nothing. Collective: every rank enters it.
    """
    import contextlib

    if not is_zero3(eng) or eng.optimizer is None:
        return contextlib.nullcontext(eng.module)
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    @contextlib.contextmanager
    def gathered():
        with unwrap_model_for_generation(eng) as unwrapped:
            yield unwrapped.module

    return gathered()


def full_precision(eng):
    """Context manager: `eng.module` holds its trained weights at full precision for the block (the plain
    engine's fp32 masters); a no-op for DeepSpeed engines, whose checkpoints hold their masters."""
    if isinstance(eng, PlainEngine):
        return eng.full_precision()
    return contextlib.nullcontext()


def full_state_dict(eng) -> dict | None:
    """The module's full state dict as CPU tensors on the main rank (None elsewhere). Collective under ZeRO-3."""
    import contextlib

    gathered = contextlib.nullcontext()
    if is_zero3(eng):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(eng.module.parameters()), modifier_rank=None)
    with gathered:
        if not is_main():
            return None
        return {k: v.detach().cpu().clone() for k, v in eng.module.state_dict().items()}


def local_numel(eng) -> dict[str, int]:
    """Model-state elements this rank holds: parameters (its ZeRO-3 shard, else all) and optimizer state."""
    import torch

    params = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in eng.module.parameters())
    inner = eng.optimizer
    while inner is not None and not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    optim = 0
    if isinstance(inner, torch.optim.Optimizer):
        optim = sum(t.numel() for state in inner.state.values() for t in state.values()
                    if torch.is_tensor(t) and t.dim() > 0)
    return {"params": int(params), "optimizer_state": int(optim)}


# --------------------------------------------------------------------------- collectives
# Every torch.distributed call of the package goes through here. A tensor stays where it lives when the
# process group's backend serves that device (`cpu:gloo,cuda:nccl`: CUDA tensors over NCCL, CPU ones over
# gloo); otherwise it is moved to the device the backend does serve (NCCL alone: the current GPU; gloo
# alone: the CPU) and the result copied back, so callers build their tensors wherever they live.

COLLECTIVES_ALWAYS = "RLHF_COLLECTIVES_ALWAYS"
# The device type a single-backend group serves here. gloo also takes CUDA tensors, copying them to the
# host itself; moving them to the CPU here instead keeps one rule for every collective.
_BACKEND_DEVICE = {"gloo": "cpu", "mpi": "cpu", "nccl": "cuda"}


def _dist():
    """torch.distributed when a process group with more than one rank exists (any process group with
    RLHF_COLLECTIVES_ALWAYS=1, so a one-GPU check sends every collective through NCCL), else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size() > 1 or os.environ.get(COLLECTIVES_ALWAYS, "") not in ("", "0"):
        return dist
    return None


def collective_device(tensor_device, backend_name: str | None = None):
    """Where a collective handles a tensor that lives on `tensor_device`: that device when the group's
    backend serves its type (a CUDA tensor under `cpu:gloo,cuda:nccl` stays on its GPU), else the CPU when
    the backend serves the CPU, else the current GPU. Decided from the two arguments alone, so tests on a
    CPU can check the CUDA cases; `backend_name` defaults to the default process group's backend."""
    import torch
    import torch.distributed as dist

    name = str(backend_name if backend_name is not None else dist.get_backend()).lower()
    if ":" in name:  # "cpu:gloo,cuda:nccl": one backend per device type
        served = {pair.split(":", 1)[0].strip() for pair in name.split(",")}
    else:  # an unknown single backend is taken for a GPU one, as NCCL
        served = {_BACKEND_DEVICE.get(name.strip(), "cuda")}
    here = torch.device(tensor_device)
    if here.type in served:
        return here
    if "cpu" in served:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


_REDUCE_OPS = ("sum", "min", "max")


def all_reduce(tensor, op: str = "sum"):
    """Reduce `tensor` over ranks in place (`op`: sum, min or max); a no-op in a single process. Returns it."""
    dist = _dist()
    if dist is None:
        return tensor
    if op not in _REDUCE_OPS:
        raise ValueError(f"all_reduce: op must be one of {_REDUCE_OPS}, got {op!r}")
    reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    moved = tensor.to(collective_device(tensor.device))
    dist.all_reduce(moved, op=reduce_op)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op in a single process). Returns it."""
    return all_reduce(tensor, "sum")


def any_rank(flag: bool) -> bool:
    """True when `flag` is set on any rank (e.g. a SIGTERM that reached only some ranks)."""
    import torch

    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), "max").item() > 0)


def broadcast(tensor, src: int = 0):
    """`tensor` from rank `src` on every rank, in place. Returns it."""
    dist = _dist()
    if dist is None:
        return tensor
    moved = tensor.to(collective_device(tensor.device))
    dist.broadcast(moved, src=src)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


_SUBGROUPS: dict[tuple, Any] = {}  # (default group, ranks) -> group: new_group is a collective, made once


def subgroup(ranks: list[int]):
    """A gloo process group of the global `ranks`, for host-memory traffic only some ranks need (file
    chunks for node-local disks). Every rank calls it, members or not: its first call for a set of ranks is
    a collective over the default group. None in a single process."""
    dist = _dist()
    if dist is None:
        return None
    key = (dist.group.WORLD, tuple(sorted(set(ranks))))
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = dist.new_group(list(key[1]), backend="gloo")
    return _SUBGROUPS[key]


def broadcast_in(group, tensor, src: int = 0):
    """`tensor` from global rank `src` on every rank of `group` (from `subgroup`), in place, through host
    memory; only the group's ranks call it. Returns it."""
    dist = _dist()
    if dist is None or group is None:
        return tensor
    moved = tensor.cpu()
    dist.broadcast(moved, src=src, group=group)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """A picklable object from rank `src` (what other ranks pass is ignored). Sent between the package's
    own ranks only; never used for data read from disk."""
    import torch

    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    # the pickle is made in host memory: it stays there when gloo is in the group
    dist.broadcast_object_list(box, src=src, device=collective_device(torch.device("cpu")))
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (torch keeps the pickles on the CPU when the group serves it)."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params) -> None:
    """Average the gradients of `params` over ranks (what DDP does at the end of backward), one flat
    buffer per (device, dtype), each reduced where it lives. A parameter without a gradient on this rank
    takes part with zeros, so every rank reduces the same tensors; a no-op in a single process."""
    import torch

    dist = _dist()
    if dist is None:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict[tuple, list] = {}
    for p in params:
        groups.setdefault((str(p.grad.device), p.grad.dtype), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        all_reduce(flat, "sum").div_(dist.get_world_size())
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def broadcast_parameters(model, src: int = 0) -> None:
    """Every parameter and buffer of `model` as rank `src` holds it (what DDP does when it wraps a model)."""
    import torch

    if _dist() is None:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            broadcast(tensor.data, src=src)


def store():
    """The default process group's key-value store, or None (single process, or a torch without the accessor)."""
    if _dist() is None:
        return None
    try:
        import torch.distributed as dist

        return dist.distributed_c10d._get_default_store()
    except Exception:  # a private accessor: without it the failure watcher is off, the collective timeout applies
        return None


def save_engine(eng, path: Path) -> None:
    """Weights, optimizer and scheduler of a trained engine under `path` (collective under DeepSpeed).

    Plain: model.safetensors, optimizer.pt and scheduler.pt (tensors and plain types only, so they load
    with `weights_only=True`). DeepSpeed: its own sharded checkpoint layout, tag `state`.
    """
    import torch
    from safetensors.torch import save_model

    path = Path(path)
    if not isinstance(eng, PlainEngine):
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
    if not isinstance(eng, PlainEngine):
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
    DeepSpeed's pickled `*_states.pt` files as its own loader does (docs/RELIABILITY.md).
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

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout may carry a command's output
            return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    model_file = ds_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ConfigError(f"{ds_dir}: no model states file (mp_rank_00_model_states.pt); the checkpoint is incomplete")
    return torch.load(model_file, map_location="cpu", weights_only=False)["module"]
