"""Collectives over the process group: sums, minima and maxima, broadcasts of tensors and objects, gradient
averaging and parameter broadcast (what DDP does), gloo subgroups of some ranks, and the group's store.

A tensor stays where it lives when the process group's backend serves that device (`cpu:gloo,cuda:nccl`:
CUDA tensors over NCCL, CPU ones over gloo); otherwise it is moved to the device the backend does serve
(NCCL alone: the current GPU; gloo alone: the CPU) and the result copied back, so callers build their
tensors wherever they live.

They do nothing at world size 1. With `RLHF_COLLECTIVES_ALWAYS=1` they run whenever a process group exists,
even of one rank: a check on a one-GPU machine (launched with NUM_GPUS=1) then sends each of them through
NCCL (GPU tensors) or gloo (host-side values), as a multi-GPU run does.
"""

from __future__ import annotations

import os
from typing import Any

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
