"""`rlhf.replicate` on CPU gloo groups of 2 and 3 processes, with "nodes" made from LOCAL_RANK and a run
dir per node: nothing is read, hashed or sent where every node sees rank 0's run dir, and where nodes
have disks of their own each chunk goes to one rank per node (the node's first), never to the others."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch.multiprocessing as mp

CHUNK = 16  # bytes per broadcast in these tests, so a file of 100 bytes takes 7 chunks


def _count(module, name: str, calls: dict[str, int], key: str | None = None) -> None:
    """Wrap `module.name` so that each call adds one to `calls[key or name]`."""
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[key or name] = calls.get(key or name, 0) + 1
        return original(*args, **kwargs)

    setattr(module, name, counted)


def _count_chunks(received: list[int]) -> None:
    """Record the size of every byte buffer this rank takes part in broadcasting (file chunks), whichever
    engine helper carries it."""
    import torch

    from rlhf import engine

    def wrap(name: str, tensor_at: int) -> None:
        original = getattr(engine, name)

        def counted(*args, **kwargs):
            tensor = args[tensor_at]
            if tensor.dtype == torch.uint8:
                received.append(tensor.numel())
            return original(*args, **kwargs)

        setattr(engine, name, counted)

    wrap("broadcast", 0)
    if hasattr(engine, "broadcast_in"):
        wrap("broadcast_in", 1)


def _start(rank: int, world: int, init_file: str, local_rank: int) -> None:
    import os

    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(local_rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _stop() -> None:
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _shared_worker(rank: int, init_file: str, root: str, out_dir: str) -> None:
    """Two ranks, each the first of its node, both with the same run dir (a shared filesystem)."""
    import torch.distributed as dist

    from rlhf import engine, replicate

    _start(rank, 2, init_file, local_rank=0)
    try:
        run = Path(root)
        if rank == 0:
            _write(run / "sft" / "final" / "model.safetensors", bytes(range(100)))
            _write(run / "sft" / "stage.json", b"{}")
        engine.barrier()
        calls: dict[str, int] = {}
        for name in ("_digest", "_listing", "_missing", "_send"):
            _count(replicate, name, calls)
        written = [replicate.replicate(run, [run / "sft" / "final"], by_content=True)]
        collectives: dict[str, int] = {}
        for name in ("all_reduce", "broadcast", "broadcast_object", "all_gather_object", "barrier"):
            _count(engine, name, collectives, key="collectives")
            # and where the engine's own helpers call it (engine.any_rank -> all_reduce)
            _count(engine.ranks if name == "barrier" else engine.collectives, name, collectives, key="collectives")
        written.append(replicate.replicate(run, [run / "sft" / "stage.json"], by_content=True))
        result = {"written": written, "calls": calls, "second_call_collectives": collectives.get("collectives", 0)}
        dist.barrier()  # rank 0 removes the probe after the others have read it
        result["left"] = sorted(p.name for p in run.iterdir())
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    finally:
        _stop()


@pytest.mark.timeout(120)
def test_a_shared_run_dir_is_neither_read_nor_hashed_nor_sent(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    mp.spawn(_shared_worker, args=(str(tmp_path / "init"), str(run), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["written"] == [[], []], rank
        assert result["calls"] == {}, f"rank {rank} listed, hashed or sent files on a shared filesystem"
        # the answer is kept per run dir: the second call costs no collective at all
        assert result["second_call_collectives"] == 0, rank
        assert result["left"] == ["sft"], "the probe file must not stay in the run dir"


# Node 0: rank 0. Node 1: ranks 1 and 2, on a disk of their own.
NODE_OF = {0: 0, 1: 1, 2: 1}
LOCAL_RANK = {0: 0, 1: 0, 2: 1}
SHARED_FILES = {"ppo/final/model.safetensors": bytes(range(100)), "ppo/final/config.json": b'{"a": 1}' * 5,
                "ppo/checkpoints/checkpoint-1/trainer_state.json": b'{"step": 1}',
                "ppo/checkpoints/checkpoint-1/checkpoint.complete": b"1"}


def _rank_files(rank: int) -> dict[str, bytes]:
    """What `rank` writes for itself into a checkpoint (a ZeRO shard, HF and PPO random states)."""
    ckpt = "ppo/checkpoints/checkpoint-1"
    return {f"{ckpt}/actor/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": bytes([rank]) * 40,
            f"{ckpt}/rng_state_{rank}.pth": bytes([rank]) * 20, f"{ckpt}/rng-{rank}.json": b"[%d]" % rank}


def _per_node_worker(rank: int, init_file: str, base: str, out_dir: str) -> None:
    from rlhf import engine, replicate

    _start(rank, 3, init_file, local_rank=LOCAL_RANK[rank])
    try:
        run = Path(base) / f"node{NODE_OF[rank]}" / "runs" / "x"
        run.mkdir(parents=True, exist_ok=True)
        for rel, data in {**(SHARED_FILES if rank == 0 else {}), **_rank_files(rank)}.items():
            _write(run / rel, data)
        engine.barrier()
        replicate.CHUNK = CHUNK
        received: list[int] = []
        _count_chunks(received)
        written = replicate.replicate(run, [run / "ppo" / "final", run / "ppo" / "checkpoints" / "checkpoint-1"],
                                      by_content=True)
        result = {"written": sorted(written), "chunks": received if rank else []}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result), encoding="utf-8")
    finally:
        _stop()


@pytest.mark.timeout(120)
def test_node_local_disks_get_one_copy_per_node_and_no_other_ranks_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(_per_node_worker, args=(str(tmp_path / "init"), str(tmp_path), str(out)), nprocs=3, join=True)
    results = {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1, 2)}
    chunks = sum(math.ceil(len(data) / CHUNK) for data in SHARED_FILES.values())
    # node 1's first rank receives every chunk of rank 0's files once; the other rank of node 1 receives none
    assert results[2]["chunks"] == [], "a second rank on a node must not receive the node's copy again"
    assert sorted(results[1]["chunks"]) == sorted(min(CHUNK, len(data) - start) for data in SHARED_FILES.values()
                                                  for start in range(0, len(data), CHUNK))
    assert len(results[1]["chunks"]) == chunks
    assert results[1]["written"] == sorted(SHARED_FILES) and results[2]["written"] == []
    node1 = tmp_path / "node1" / "runs" / "x"
    for rel, data in SHARED_FILES.items():
        assert (node1 / rel).read_bytes() == data, rel
    # rank 0's own shard and random states stay on node 0; node 1 keeps what its own ranks wrote
    for rel in _rank_files(0):
        assert not (node1 / rel).exists(), rel
    for rank in (1, 2):
        for rel, data in _rank_files(rank).items():
            assert (node1 / rel).read_bytes() == data, rel
