"""`ppo.generation: static` samples the same rollouts as HF generate, so a PPO run is the same run.

On CPU `graph` falls back to the static path (no CUDA graphs); `scripts/gpu_check.sh` and
`bench/decode_speed.py` exercise the graph on a GPU.
"""

from __future__ import annotations

import pytest
from test_ppo import make_cfg, run_ppo


def _run(tmp_path, policy, generation: str, lora: bool = False):
    cfg = make_cfg(tmp_path, policy, None, steps=2, reward_fn="ppo_reward:target_share", critic_init="sft",
                   generation=generation, max_new_tokens=12)
    if lora:
        cfg.model.lora.enabled, cfg.model.lora.r = True, 4
    decoders = []
    _, seen = run_ppo(cfg, on_step=lambda ctx, stats: decoders.append(ctx.decoder))
    used = [d is not None and d.cache is not None for d in decoders]
    assert used == [generation != "hf"] * len(seen)  # the static decoder sampled every rollout, or none
    return seen


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_static_generation_gives_the_same_run_as_hf_generate(tmp_path, tiny_model_dir, lora):
    hf = _run(tmp_path / "hf", tiny_model_dir, "hf", lora)
    static = _run(tmp_path / "static", tiny_model_dir, "graph", lora)  # no CUDA here: the static path
    keys = ("objective/score_raw_mean", "rollout/response_length", "objective/kl", "policy/loss", "value/loss")
    for a, b in zip(hf, static, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert hf[1]["objective/kl"] != 0.0  # the second rollout came from the trained actor (adapters on, for LoRA)
