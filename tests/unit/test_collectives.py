"""Collectives through `rlhf.engine` only, on the process-group layout CUDA machines get.

On a CUDA machine the package creates its process group as `cpu:gloo,cuda:nccl`, so that flags, step
numbers and file chunks (CPU tensors) have a backend next to NCCL. The `cpu:gloo` half is exercised here on
two CPU processes: every helper the stages use (sums, min, max, flags, objects, file chunks, gradient
averaging, parameter broadcast, the resume-step agreement) must give each rank the same, right answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import rlhf
from rlhf import engine

PACKAGE = Path(rlhf.__file__).parent


def test_no_torch_distributed_call_outside_engine():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(PACKAGE / "engine"):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"import torch\.distributed|from torch import distributed|torch\.distributed\.|\bdist\.",
                         line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "collectives must go through rlhf.engine:\n" + "\n".join(offenders)


CUDA0, CUDA1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")


@pytest.mark.parametrize(("where", "name", "expected"), [
    (CPU, "gloo", CPU), (CPU, "cpu:gloo", CPU), (CPU, "cpu:gloo,cuda:nccl", CPU),
    (CUDA0, "cpu:gloo,cuda:nccl", CUDA0),  # PPO's gradients stay on the GPU and go over NCCL
    (CUDA1, "cuda:nccl,cpu:gloo", CUDA1), (CUDA1, "nccl", CUDA1),
    (CUDA0, "gloo", CPU), (CUDA0, "cpu:gloo", CPU),  # no GPU backend: through the host
    (CPU, "nccl", torch.device("cuda", 3)),  # NCCL alone: onto the current GPU
], ids=lambda v: str(v))
def test_a_tensor_stays_where_the_backend_serves_its_device(monkeypatch, where, name, expected):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert engine.collective_device(where, name) == expected


class _RecordingDist:
    """Stands in for torch.distributed at world size 2: records where each collective got its tensor,
    and leaves the values as they are (so a sum is this rank's value)."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self):
        self.reduced: list[tuple[str, torch.dtype, int]] = []
        self.object_device = None

    def get_world_size(self):
        return 2

    def all_reduce(self, tensor, op):
        self.reduced.append((str(tensor.device), tensor.dtype, tensor.numel()))

    def broadcast(self, tensor, src):
        self.reduced.append((str(tensor.device), tensor.dtype, tensor.numel()))

    def broadcast_object_list(self, box, src, device):
        self.object_device = device


def test_collectives_reduce_each_tensor_where_it_lives(monkeypatch):
    # "meta" stands in for a GPU (a device the group's backend serves besides the CPU): a CPU-only
    # machine cannot make CUDA tensors, but can check that nothing is sent through the host
    fake = _RecordingDist()
    monkeypatch.setattr(engine.collectives, "_dist", lambda: fake)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "cpu:gloo,meta:fake")
    on_gpu = torch.zeros(3, device="meta")
    assert engine.all_reduce(on_gpu) is on_gpu and engine.broadcast(on_gpu) is on_gpu
    assert fake.reduced == [("meta", torch.float32, 3)] * 2
    engine.broadcast_object({"a": 1})
    assert fake.object_device == CPU  # the pickles stay in host memory when gloo is there

    fake.reduced.clear()
    cpu_weight = torch.nn.Parameter(torch.zeros(2, 3))
    cpu_double = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    gpu_weight = torch.nn.Parameter(torch.zeros(5, device="meta"))
    for p in (cpu_weight, cpu_double, gpu_weight):
        p.grad = torch.full_like(p, 4.0)
    engine.average_gradients([cpu_weight, cpu_double, gpu_weight])
    # one flat buffer per (device, dtype), each reduced where its gradients are
    assert sorted(fake.reduced, key=str) == sorted([("cpu", torch.float32, 6), ("cpu", torch.float64, 4),
                                                    ("meta", torch.float32, 5)], key=str)
    assert cpu_weight.grad.tolist() == [[2.0] * 3] * 2 and cpu_double.grad.tolist() == [2.0] * 4  # 4 / 2 ranks
    assert gpu_weight.grad.device.type == "meta"


def test_object_pickles_go_to_the_gpu_only_under_nccl_alone(monkeypatch):
    fake = _RecordingDist()
    monkeypatch.setattr(engine.collectives, "_dist", lambda: fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    engine.broadcast_object(1)
    assert fake.object_device == torch.device("cuda", 2)


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank in this process, destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


def _counted_calls(monkeypatch, dist) -> list[str]:
    """Wrap torch.distributed's collectives to record each call by name (they still run)."""
    calls: list[str] = []
    for name in ("all_reduce", "broadcast", "broadcast_object_list", "all_gather_object"):
        real = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@pytest.mark.timeout(60)
def test_collectives_run_at_world_size_one_when_asked(monkeypatch, one_rank_group):
    calls = _counted_calls(monkeypatch, one_rank_group)
    monkeypatch.delenv(engine.COLLECTIVES_ALWAYS, raising=False)
    engine.all_reduce(torch.ones(2))
    assert calls == [] and engine.store() is None  # one rank: nothing to agree on, nothing sent

    monkeypatch.setenv(engine.COLLECTIVES_ALWAYS, "1")
    assert engine.all_reduce(torch.tensor([2.0, 3.0]), "max").tolist() == [2.0, 3.0]
    assert engine.any_rank(True) and not engine.any_rank(False)
    assert engine.broadcast(torch.arange(3)).tolist() == [0, 1, 2]
    assert engine.broadcast_object({"k": 1}) == {"k": 1} and engine.all_gather_object("x") == ["x"]
    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.full_like(model.weight, 3.0)
    engine.average_gradients(model.parameters())
    engine.broadcast_parameters(model)
    assert model.weight.grad.tolist() == [[3.0, 3.0]] and model.bias.grad.tolist() == [0.0]
    assert calls == ["all_reduce"] * 3 + ["broadcast", "broadcast_object_list", "all_gather_object"] + \
        ["all_reduce"] + ["broadcast"] * 2  # average_gradients: one float32 buffer; then weight and bias
    assert engine.store() is not None

    monkeypatch.setenv(engine.COLLECTIVES_ALWAYS, "0")
    calls.clear()
    engine.all_reduce(torch.ones(2))
    assert calls == []


def test_backend_on_cuda_machines_serves_cpu_tensors_too(monkeypatch):
    monkeypatch.setattr(engine.ranks, "cuda_available", lambda: True)
    assert engine.backend() == "cpu:gloo,cuda:nccl"
    monkeypatch.setattr(engine.ranks, "cuda_available", lambda: False)
    assert engine.backend() == "gloo"


def _gpus(monkeypatch, count: int, local_rank: int, visible: str | None) -> None:
    """Pretend this process sees `count` GPUs as local rank `local_rank` (CUDA_VISIBLE_DEVICES=`visible`)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def test_device_rule(monkeypatch):
    _gpus(monkeypatch, 0, 0, "")
    assert engine.device("auto") == torch.device("cpu") and engine.device("cuda") == torch.device("cpu")
    _gpus(monkeypatch, 8, 5, None)  # torchrun: every GPU of the node visible
    assert engine.device("auto") == torch.device("cuda", 5)
    _gpus(monkeypatch, 4, 3, "4,5,6,7")  # the deepspeed launcher: the node's GPUs for its ranks
    assert engine.device("auto") == torch.device("cuda", 3)
    assert engine.device("cpu") == torch.device("cpu")
    for rank in (0, 3):  # a scheduler that shows each rank only its own GPU
        _gpus(monkeypatch, 1, rank, "6")
        assert engine.device("auto") == torch.device("cuda", 0)


@pytest.mark.parametrize(("count", "rank", "visible"), [
    (2, 3, None),  # 4 ranks on a node with 2 GPUs: ranks 1 and 3 would share one
    (1, 1, "0,1"),  # NUM_GPUS=2 on a one-GPU machine: the launcher names a GPU that is not there
    (1, 1, None),  # torchrun with 2 ranks on a one-GPU machine
    (2, 2, "0,1"),
])
def test_more_local_ranks_than_visible_gpus_is_refused(monkeypatch, count, rank, visible):
    from rlhf.errors import ConfigError

    _gpus(monkeypatch, count, rank, visible)
    with pytest.raises(ConfigError) as err:
        engine.device("auto")
    message = str(err.value)
    assert "\n" not in message and f"LOCAL_RANK={rank}" in message and f"sees {count} GPU" in message
    assert f"CUDA_VISIBLE_DEVICES={visible or 'unset'}" in message and f"NUM_GPUS={count}" in message
    assert engine.device("cpu") == torch.device("cpu")  # a CPU run on that machine is fine


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from rlhf import replicate

    dist.init_process_group("cpu:gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        results["sum"] = engine.all_reduce(torch.tensor([rank + 1.0, 2.0], dtype=torch.float64)).tolist()
        results["min"] = engine.all_reduce(torch.tensor([rank + 5]), "min").tolist()
        results["max"] = engine.all_reduce(torch.tensor([rank + 5]), "max").tolist()
        results["any_rank"] = [engine.any_rank(rank == 1), engine.any_rank(False)]
        results["object"] = engine.broadcast_object({"from": rank} if rank == 0 else None)
        results["gathered"] = engine.all_gather_object(f"rank{rank}")
        chunk = torch.arange(4, dtype=torch.uint8) if rank == 0 else torch.zeros(4, dtype=torch.uint8)
        results["chunk"] = engine.broadcast(chunk, src=0).tolist()
        # gradients: rank 1 has none for `b` (an unused parameter): it takes part with zeros
        torch.manual_seed(rank)  # different initial weights per rank: broadcast_parameters makes them rank 0's
        model = torch.nn.Linear(2, 1)
        engine.broadcast_parameters(model)
        results["weight"] = model.weight.detach().flatten().tolist()
        model.weight.grad = torch.full_like(model.weight, float(rank + 1))
        model.bias.grad = torch.ones_like(model.bias) if rank == 0 else None
        engine.average_gradients(model.parameters())
        results["grads"] = [model.weight.grad.flatten().tolist(), model.bias.grad.tolist()]
        results["agreed_step"] = replicate.agree_on_step(4 if rank == 0 else None)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results), encoding="utf-8")
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_every_collective_helper_on_a_cpu_gloo_group(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["sum"] == [3.0, 4.0]
        assert r["min"] == [5] and r["max"] == [6]
        assert r["any_rank"] == [True, False]
        assert r["object"] == {"from": 0}
        assert r["gathered"] == ["rank0", "rank1"]
        assert r["chunk"] == [0, 1, 2, 3]
        assert r["grads"] == [[1.5, 1.5], [0.5]]  # mean of 1 and 2; mean of 1 and (missing = 0)
        assert r["agreed_step"] is None  # a rank without a checkpoint: everyone starts fresh
    assert ranks[0]["weight"] == ranks[1]["weight"]


def test_auto_dtype_is_bf16_on_a_gpu_that_has_it_else_fp32(monkeypatch):
    from rlhf.config import config_from_dict

    cfg = config_from_dict({"model": {"dtype": "auto"}}, source="t")
    monkeypatch.setattr(engine.ranks, "cuda_available", lambda: False)
    assert engine.run_dtype(cfg, engine.device(cfg.run.device)) == "float32"
    monkeypatch.setattr(engine.ranks, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert engine.run_dtype(cfg, engine.device(cfg.run.device)) == "bfloat16"
    cfg.run.device = "cpu"
    assert engine.run_dtype(cfg, engine.device(cfg.run.device)) == "float32"  # a CPU run on a GPU machine stays in float32
    cfg.run.device = "auto"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert engine.run_dtype(cfg, engine.device(cfg.run.device)) == "float32"
    cfg.model.dtype = "float16"
    assert engine.run_dtype(cfg, engine.device(cfg.run.device)) == "float16"  # an explicit dtype is kept
