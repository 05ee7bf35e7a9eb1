"""PPO's models under ZeRO-3 on 2 CPU ranks, the DeepSpeed way: every scored model's forward goes through
the engine's top-level module, and every model is loaded already partitioned over the ranks.

- DeepSpeed starts each forward's parameter trace (and its prefetching from that trace) in a hook on the
  top-level module of an engine. The critic and the reward model are called through one `ScalarHead`
  module, so that hook runs once per forward, and the reward model's trace becomes complete.
- The static decoder's KV cache (`ppo.generation: static`) is released after every rollout under ZeRO-3.
- `build_models` loads each ZeRO-3 role under DeepSpeed's zero.Init (`engine.partitioned_loading`), so
  every model reaches `engine.wrap` already partitioned. What that saves in host memory is measured by
  `bench/zero3_load_memory.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch import deepspeed_cli, ppo_config  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
PROBE = Path(__file__).parent / "ppo_zero3_probe.py"


def _probe(args: list[str], out: Path) -> list:
    out.mkdir(parents=True, exist_ok=True)
    proc = deepspeed_cli([*args[:2], str(out), *args[2:]], script=PROBE, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_zero3_models_load_partitioned_and_are_scored_through_their_top_module(tmp_path, tiny_model_dir,
                                                                               tiny_reward_dir):
    config = ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, zero_stage=3,
                        ppo={"steps": 3, "mini_batch_size": 4, "grad_accum": 2, "save_steps": 100,
                             "generation": "static"})
    for report in _probe(["trace", str(config)], tmp_path / "out"):
        # every model was built partitioned (zero.Init), not whole and then sharded by DeepSpeed
        assert report["loaded_partitioned"] == {"actor": True, "critic": True, "ref": True, "reward": True}
        records = report["steps"]
        assert [r["step"] for r in records] == [2, 3]
        for r in records:
            # per step: 2 rollout chunks each for values and scores, and the update's second micro-batch for
            # the critic (its first reuses the rollout's forward)
            assert r["resets"]["critic"] >= 3 and r["resets"]["reward"] >= 2, r
            assert r["complete"]["reward"], r  # forward-only, the same modules each time: a complete trace
            # the static decoder's KV cache is freed after each rollout: a ZeRO-3 actor's weights move anyway
            assert not r["kv_cache_kept"], r
        assert any(r["complete"]["critic"] for r in records), records
