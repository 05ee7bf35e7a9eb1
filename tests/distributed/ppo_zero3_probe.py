"""Run under the deepspeed launcher (CPU ranks) by test_ppo_zero3_models.py; each rank writes OUT/rank<r>.json.

  ppo_zero3_probe.py trace CONFIG OUT        PPO for the config's steps; after each step, for the critic and
                                             the reward model: how often DeepSpeed's ZeRO-3 parameter
                                             coordinator started a forward (`reset_step`, called from its hook
                                             on the engine's top-level module) and whether its trace is
                                             complete; and per role whether the model came to `engine.wrap`
                                             already partitioned (loaded under zero.Init)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _coordinator(eng):
    """The ZeRO-3 parameter coordinator of a trained engine (its optimizer's) or an inference engine (DeepSpeed
    keeps it in a `DeepSpeedZeRoOffload` in the optimizer's place)."""
    holder = getattr(eng.optimizer, "parameter_offload", eng.optimizer)
    return holder.get_param_coordinator()


def trace(config: str, out: Path) -> None:
    from rlhf import engine
    from rlhf.config import load_config
    from rlhf.stages import ppo

    cfg = load_config(config)
    engine.init_distributed()
    records, counts, partitioned = [], {}, {}
    wrap = engine.wrap

    def wrap_and_look(model, ds, role, **kwargs):  # was the model partitioned before DeepSpeed wrapped it?
        partitioned[role] = all(hasattr(p, "ds_id") for p in model.parameters())
        return wrap(model, ds, role, **kwargs)

    engine.wrap = wrap_and_look

    def count_resets(role: str, eng) -> None:
        coordinator = _coordinator(eng)
        counts[role] = 0
        original = coordinator.reset_step

        def reset_step():
            counts[role] += 1
            return original()

        coordinator.reset_step = reset_step

    def on_step(ctx, stats) -> None:
        if ctx.step == 1 and not counts:  # from step 2 on: the forwards of one whole step
            count_resets("critic", ctx.critic)
            count_resets("reward", ctx.scorer.engine)
            return
        records.append({"step": ctx.step, "resets": dict(counts), "kv_cache_kept": ctx.decoder.cache is not None,
                        "complete": {"critic": _coordinator(ctx.critic).is_complete_trace(),
                                     "reward": _coordinator(ctx.scorer.engine).is_complete_trace()}})

    try:
        ppo.run(cfg, on_step=on_step)
        (out / f"rank{engine.rank()}.json").write_text(json.dumps({"steps": records, "loaded_partitioned":
                                                                   partitioned}))
    finally:
        engine.cleanup()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    trace(args[1], Path(args[2]))
