"""PPO's engines (its own loop): one model wrapped as a DeepSpeed engine (`initialize`) or as a
`PlainEngine` with the same surface (`wrap`), the AdamW they train with, the fp32 `MasterWeights` of a
half-precision plain engine, ZeRO-3 roles loaded already partitioned (`partitioned_loading`), the optimizer
step that may skip a non-finite update (`step_or_skip`), and what the loop reads of an engine: its gradient
norm, its full-precision weights, its full state dict, its model-state size and where it computes."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Protocol

from rlhf.config import DeepSpeedCfg
from rlhf.engine import collectives, dsconfig, ranks
from rlhf.errors import ConfigError


def initialize(model, ds_cfg: dict[str, Any], optimizer=None, lr_scheduler=None, model_parameters=None):
    """Wrap one model in a DeepSpeed engine (PPO). Returns the engine. `lr_scheduler` may be a callable
    that DeepSpeed applies to the optimizer it builds."""
    import deepspeed

    dsconfig.skip_cpu_shm_comm()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                      model_parameters=model_parameters, config=ds_cfg, dist_init_required=False)
    return engine


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
        collectives.broadcast_parameters(model)
        if masters is not None:  # rank 0's weights, rounded: the masters must start from what ranks share
            for master in masters.masters:
                collectives.broadcast(master.data)
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
            collectives.average_gradients(params)
            self._synced = True
        return params

    def full_precision(self):
        """Context manager: the module with its trained weights at full precision (the fp32 masters, where
        the engine keeps them) for the block, to save or load them."""
        return self.masters.in_module() if self.masters is not None else contextlib.nullcontext()


def _set_ds_accelerator(device) -> None:
    """DeepSpeed's accelerator for a run on `device` (it is chosen once, when DeepSpeed is first imported)."""
    on_cpu = device is None or getattr(device, "type", str(device)) == "cpu"
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if on_cpu or not ranks.cuda_available() else "cuda")


@contextlib.contextmanager
def partitioned_loading(ds: DeepSpeedCfg, role: str, *, train: bool, micro_batch: int, grad_accum: int,
                        dtype: str, device=None):
    """Around loading one PPO model. Under DeepSpeed with the role at ZeRO-3, transformers builds the model
    already partitioned over the ranks (DeepSpeed's zero.Init, from this role's config) and each rank keeps
    only its shard, where a plain load would hold the whole model on every rank until `wrap` shards it
    (for an 8B PPO run on 8 ranks, four full models per rank). Collective then: every rank loads.
    Elsewhere it does nothing."""
    if not ranks.use_deepspeed(ds) or ds.role(role).zero_stage != 3:
        yield
        return
    _set_ds_accelerator(device)
    dsconfig.skip_cpu_shm_comm()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    conf = dsconfig.role_config(ds, role, train=train, micro_batch=micro_batch, grad_accum=grad_accum,
                                dtype=dtype)
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
    if not ranks.use_deepspeed(ds):
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
    conf = dsconfig.role_config(ds, role, train=train, micro_batch=micro_batch, grad_accum=grad_accum,
                                max_grad_norm=max_grad_norm, dtype=dtype,
                                hidden_size=dsconfig.model_hidden_size(model))
    if not train:
        return initialize(model, conf)
    role_cfg = ds.role(role)
    if dsconfig.offloads_optimizer(role_cfg):
        conf["optimizer"] = adamw.ds_section(dsconfig.uses_torch_adam(ds))
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


def adapters_disabled(eng):
    """Context manager: the engine's LoRA adapters off for the block, so that calling the engine runs its
    base model (a LoRA actor's reference is the actor without its adapters). The engine's forward is the
    one that runs: under ZeRO-3 its hooks still gather the base weights."""
    return eng.module.disable_adapter()


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
        if not ranks.is_main():
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
