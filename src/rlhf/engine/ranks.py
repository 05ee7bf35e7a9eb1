"""Launcher, ranks and device: whether a launcher started this process, its ranks, the run's device and
dtype, whether DeepSpeed is on, and the process group's setup (`init_distributed`, `probe_links`), barrier
and teardown (`cleanup`)."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from rlhf.config import DeepSpeedCfg, PipelineConfig
from rlhf.engine import collectives
from rlhf.errors import ConfigError

if TYPE_CHECKING:
    import torch


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
    """The run's device: `cuda:<LOCAL_RANK>` when CUDA is present and `run.device` is not `cpu`, else the CPU.
    Each entry decides it once and passes it on: preflight's checks, a stage (`StageRun.device`), a command
    that loads a model outside training (through `usable_device`). PPO, the Trainer stages' held-out checks
    and those commands put their models there, and `init_distributed` makes `device()`'s GPU the current one.
    The Trainer stages' training only learns whether it is the CPU (`trainer_kwargs`): the HF Trainer
    (accelerate, or DeepSpeed's engine) picks the local rank's GPU itself.

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


def usable_device(run_device: str, where: str = "run.device", source: str | None = None):
    """`device(run_device)` for the commands that load a model outside training (eval, data synth, chat,
    score): `cuda` where torch sees no CUDA GPU is a ConfigError naming `where` (the config key, in the file
    `source`, or the flag), never a silent run on the CPU; training refuses it the same way in preflight."""
    import torch

    if run_device == "cuda" and not cuda_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        fix = f"pass {where} auto" if where.startswith("--") else f"set {where}: auto"
        raise ConfigError(f"{source + ': ' if source else ''}{where} is cuda but torch sees no CUDA GPU (torch "
                          f"{torch.__version__}, {build}); install a CUDA build of torch, check "
                          f"CUDA_VISIBLE_DEVICES, or {fix}")
    return device(run_device)


def run_dtype(cfg: PipelineConfig, torch_device: torch.device) -> str:
    """`model.dtype` with `auto` resolved: bfloat16 on a GPU that has it, else float32. `torch_device`: the
    run's device as the process decided it once (`device(cfg.run.device)`, e.g. `StageRun.device`)."""
    import torch

    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    on_gpu = torch_device.type == "cuda"
    return "bfloat16" if on_gpu and torch.cuda.is_bf16_supported() else "float32"


def trained_load_dtype(cfg: PipelineConfig, torch_device: torch.device) -> str:
    """The dtype a model that will be trained is loaded in. DeepSpeed's bf16 and fp16 modes keep fp32 master
    weights of what it trains, so there the run's dtype; without DeepSpeed, float32: the fp32 weights become
    the masters (`MasterWeights` in PPO's plain engine; the HF Trainer computes under autocast). Frozen
    models load in `run_dtype`. `torch_device` as in `run_dtype`."""
    return run_dtype(cfg, torch_device) if use_deepspeed(cfg.deepspeed) else "float32"


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
    failwatch.start(collectives.store(), rank())


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
