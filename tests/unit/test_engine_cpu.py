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
