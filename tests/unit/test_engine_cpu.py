"""DeepSpeed on a CPU-only machine: nothing is compiled at launch."""

from __future__ import annotations

import importlib

import pytest

from rlhf import engine

pytest.importorskip("deepspeed")


def test_cpu_comm_backend_skips_the_shared_memory_op(tmp_path, monkeypatch):
    # DeepSpeed's torch comm backend calls build_shm_op() when it starts; unmarked, that compiles C++
    # into TORCH_EXTENSIONS_DIR (minutes on 2 cores) on every fresh machine.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    engine.skip_cpu_shm_comm()
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    assert comm_torch.build_shm_op() is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(120)
def test_engines_the_package_builds_never_synchronize_in_forward(tmp_path, monkeypatch):
    # DeepSpeed's throughput timer synchronizes the device at the start of every forward once the engine
    # has taken two optimizer steps; inside a CUDA-graph capture that synchronize raises. One rank, gloo.
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from rlhf.config import DeepSpeedCfg

    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    accelerator = get_accelerator()
    synced: list[int] = []
    real = accelerator.synchronize
    monkeypatch.setattr(accelerator, "synchronize", lambda *a, **k: synced.append(1) or real(*a, **k))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        model.config = type("Config", (), {"hidden_size": 4})()
        eng = engine.wrap(model, DeepSpeedCfg(enabled=True, zero_stage=2), "actor", adamw=engine.AdamW(lr=1e-3))
        for _ in range(4):
            eng.backward(eng(torch.ones(1, 4)).sum())
            eng.step()
    finally:
        dist.destroy_process_group()
    assert eng.global_steps == 4 and synced == []
    assert not eng.tput_timer.config.enabled
