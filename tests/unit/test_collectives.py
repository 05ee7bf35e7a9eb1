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
        if path.name == "engine.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"import torch\.distributed|from torch import distributed|torch\.distributed\.|\bdist\.",
                         line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "collectives must go through rlhf.engine:\n" + "\n".join(offenders)


@pytest.mark.parametrize(("name", "expected"), [("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("cpu:gloo", "cpu")])
def test_cpu_tensors_stay_on_the_cpu_where_a_cpu_backend_exists(name, expected):
    assert engine.collective_device(name).type == expected


def test_nccl_alone_needs_the_tensor_on_the_current_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert engine.collective_device("nccl") == torch.device("cuda", 3)


def test_backend_on_cuda_machines_serves_cpu_tensors_too(monkeypatch):
    monkeypatch.setattr(engine, "cuda_available", lambda: True)
    assert engine.backend() == "cpu:gloo,cuda:nccl"
    monkeypatch.setattr(engine, "cuda_available", lambda: False)
    assert engine.backend() == "gloo"


def test_device_rule(monkeypatch):
    monkeypatch.setattr(engine, "cuda_available", lambda: False)
    assert engine.device("auto") == torch.device("cpu") and engine.device("cuda") == torch.device("cpu")
    monkeypatch.setattr(engine, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")  # one node, 4 ranks, 2 visible GPUs: wraps around
    assert engine.device("auto") == torch.device("cuda", 1)
    assert engine.device("cpu") == torch.device("cpu")


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
    monkeypatch.setattr(engine, "cuda_available", lambda: False)
    assert engine.run_dtype(cfg) == "float32"
    monkeypatch.setattr(engine, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert engine.run_dtype(cfg) == "bfloat16"
    cfg.run.device = "cpu"
    assert engine.run_dtype(cfg) == "float32"  # a CPU run on a GPU machine stays in float32
    cfg.run.device = "auto"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert engine.run_dtype(cfg) == "float32"
    cfg.model.dtype = "float16"
    assert engine.run_dtype(cfg) == "float16"  # an explicit dtype is kept
