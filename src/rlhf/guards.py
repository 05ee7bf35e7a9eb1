"""Non-finite values (NaN/inf) in losses, gradients, rewards and KL: stop the run, or skip the step.

`run.on_nonfinite: stop` (default) ends the run with a one-line `TrainingError` naming the stage, step and
quantity; nothing non-finite is ever saved, so the last checkpoint stays the resume point.
`run.on_nonfinite: skip` drops the update of the bad step and goes on, with a warning: its gradients are
discarded, so the weights and the optimizer's moments stay as they were. Where this package discards them
(`drop_nonfinite_grads`: plain torch, and PPO's engines at ZeRO stage 0) the optimizer and learning-rate
scheduler still step, as `engine.PlainEngine.step` does, so the schedule advances one step; where
DeepSpeed's own check discards the step (it counts it in `skipped_steps`) the scheduler does not step.
`run.max_consecutive_skips` skips in a row mean the fault is persistent, and the run stops as in `stop` mode.

A CUDA out-of-memory error inside `catch_oom` becomes a one-line `TrainingError` naming the stage, the
model and what to change, with the last complete checkpoint kept.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

from rlhf import artifacts
from rlhf.errors import TrainingError

log = logging.getLogger("rlhf")


def is_finite(value) -> bool:
    """True when a float or every element of a tensor is finite."""
    import torch

    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return bool(torch.isfinite(torch.as_tensor(value)).all())


def grads_finite(params: Iterable) -> bool:
    """True when every present gradient is finite (params without a gradient are ignored)."""
    import torch

    flags = [torch.isfinite(p.grad).all() for p in params if getattr(p, "grad", None) is not None]
    return bool(torch.stack(flags).all()) if flags else True


def drop_nonfinite_grads(params: Iterable) -> bool:
    """When any gradient is NaN/inf, discard all of them and return True. Torch optimizers leave a parameter
    without a gradient untouched (no moment update, no weight decay), so the following `optimizer.step()`
    applies nothing."""
    params = list(params)
    if grads_finite(params):
        return False
    for p in params:
        p.grad = None
    return True


class NonFiniteGuard:
    """Counts skipped steps and builds the messages for one stage run."""

    def __init__(self, stage: str, mode: str, max_consecutive: int, ckpt_dir: Path, hint: str):
        self.stage, self.mode, self.max_consecutive = stage, mode, max_consecutive
        self.ckpt_dir, self.hint = ckpt_dir, hint
        self.total = 0
        self.consecutive = 0

    @property
    def skipping(self) -> bool:
        return self.mode == "skip"

    def stop_error(self, what: str, value, step: int, window: str = "") -> TrainingError:
        kept = artifacts.latest_checkpoint(self.ckpt_dir)
        kept_text = f"the last good checkpoint {kept} is kept" if kept is not None else "no checkpoint was saved yet"
        return TrainingError(f"{self.stage}: {what} is {_show(value)} at step {step}{window}; stopped before saving: "
                             f"{kept_text}. {self.hint}, then re-run the same command (add --restart after changing a "
                             "setting the weights depend on: resuming under it is refused)")

    def skipped(self, what: str, value, step: int) -> None:
        """Record a skipped step; raises once `max_consecutive` steps in a row were skipped."""
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise self.stop_error(what, value, step, f" ({self.consecutive} steps in a row; "
                                  f"run.max_consecutive_skips={self.max_consecutive})")
        log.warning("%s: %s is %s at step %d; skipped this update (run.on_nonfinite=skip; %d in a row, %d in total)",
                    self.stage, what, _show(value), step, self.consecutive, self.total)

    def ok(self) -> None:
        self.consecutive = 0


def _show(value) -> str:
    import torch

    if isinstance(value, (int, float)):
        return str(float(value))
    t = torch.as_tensor(value).detach().flatten().float()
    bad = t[~torch.isfinite(t)]
    return str(bad[0].item()) if bad.numel() else str(t[:1].tolist())


# --------------------------------------------------------------------------- CUDA out of memory

PPO_ROLES = ("actor", "critic", "ref", "reward")


@contextlib.contextmanager
def catch_oom(stage: str, role: str, ckpt_dir: Path, hint_config: str | None = None, *,
              batch_key: str | None = None) -> Iterator[None]:
    """Turn `torch.OutOfMemoryError` (= torch.cuda.OutOfMemoryError) raised in the block into a one-line
    `TrainingError` (exit 3): the stage, the model role (policy, reward; PPO: actor, critic, ref, reward),
    the last complete checkpoint under `ckpt_dir` (kept: nothing is saved after the error), and the
    `rlhf plan` command and settings to try. `hint_config` is the config file to name in that command;
    `batch_key` the batch-size key to lower (default: the stage's micro-batch key)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as err:
        raise TrainingError(oom_message(stage, role, str(err), artifacts.latest_checkpoint(ckpt_dir),
                                        plan_command(stage, hint_config, _gpu_mem_gib()),
                                        batch_key or micro_batch_key(stage))) from err


def oom_message(stage: str, role: str, error: str, kept: Path | None, plan: str, batch_key: str) -> str:
    """One line: where it ran out (stage, model, torch's reason), what is kept, what to run and try."""
    kept_text = f"the last complete checkpoint {kept} is kept" if kept is not None else "no complete checkpoint yet"
    return (f"{stage}: CUDA out of memory in the {role} model ({oom_reason(error)}); {kept_text}; run `{plan}` and "
            f"try {memory_settings(stage, role)}, or a smaller {batch_key}")


def oom_reason(error: str) -> str:
    """The start of torch's message: what it tried to allocate and how full the GPU was, not its advice."""
    first = (error.strip().splitlines() or ["out of memory"])[0]
    return ". ".join(first.split(". ")[:3]).rstrip(".")[:200]


def memory_settings(stage: str, role: str) -> str:
    """The config keys `rlhf plan` varies, cheapest first; PPO roles have their own `deepspeed.<role>` keys,
    and the frozen ones (ref, reward) hold no optimizer state to offload."""
    prefix = f"deepspeed.{role}." if stage == "ppo" and role in PPO_ROLES else "deepspeed."
    offload = [f"{prefix}offload_param=true"]
    if not (stage == "ppo" and role in ("ref", "reward")):
        offload.insert(0, f"{prefix}offload_optimizer=true")
    return f"{prefix}zero_stage=3, then {' and '.join(offload)}"


def micro_batch_key(stage: str) -> str:
    """The key that sets a stage's micro-batch (PPO's is mini_batch_size / grad_accum; it generates
    rollout_batch_size prompts at once)."""
    if stage == "ppo":
        return "ppo.rollout_batch_size or ppo.mini_batch_size (or a larger ppo.grad_accum)"
    return f"{stage}.batch_size"


def plan_command(stage: str, config: str | None, gpu_mem_gib: float | None) -> str:
    """`rlhf plan` for this launch: GPUs per node and nodes from the launcher's environment."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    nodes = max(int(os.environ.get("WORLD_SIZE", "1")) // max(per_node, 1), 1)
    shown = config if config and not config.startswith("<") else "FILE"  # "<dict>": not loaded from a file
    parts = [f"rlhf plan --config {shown} --gpus {per_node}"]
    if nodes > 1:
        parts.append(f"--nodes {nodes}")
    if gpu_mem_gib is not None:
        parts.append(f"--gpu-mem {int(gpu_mem_gib)}")  # rounded down: a plan must not assume memory it lacks
    parts.append(f"--stage {stage}")
    return " ".join(parts)


def _gpu_mem_gib() -> float | None:
    """This rank's GPU memory in GiB (None without CUDA): `rlhf plan` suggests settings only when given it."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
