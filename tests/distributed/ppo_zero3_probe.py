"""The rlhf CLI with PPO watched, run under the deepspeed launcher (CPU ranks) by test_ppo_zero3.py in place of
`--module rlhf.cli`, so one launch both trains (what that test checks on disk) and reports what the ranks saw:

  ppo_zero3_probe.py OUT <rlhf arguments>    `rlhf <arguments>` (e.g. `ppo --config CONFIG`); each rank writes
                                             OUT/rank<r>.json when PPO returns: for each step after the run's
                                             first, for the critic and the reward model, how often DeepSpeed's
                                             ZeRO-3 parameter coordinator started a forward in that step
                                             (`reset_step`, called from its hook on the engine's top-level
                                             module) and whether its trace is complete, and whether the static
                                             decoder kept its KV cache; and per role whether the model came to
                                             `engine.wrap` already partitioned (loaded under zero.Init)
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


def watched_cli(out: Path, argv: list[str]) -> int:
    from rlhf import cli, engine
    from rlhf.stages import ppo

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

    def watch(ctx, stats) -> None:
        if not counts:  # after the run's first step: from then on, the forwards of one whole step
            count_resets("critic", ctx.critic)
            count_resets("reward", ctx.scorer.engine)
            return
        records.append({"step": ctx.step, "resets": dict(counts), "kv_cache_kept": ctx.decoder.cache is not None,
                        "complete": {"critic": _coordinator(ctx.critic).is_complete_trace(),
                                     "reward": _coordinator(ctx.scorer.engine).is_complete_trace()}})
        counts.update(dict.fromkeys(counts, 0))  # the next record counts its own step only

    run = ppo.run

    def run_watched(cfg, *, restart: bool = False, on_step=None):
        assert on_step is None, "the CLI passes no on_step of its own"
        result = run(cfg, restart=restart, on_step=watch)
        (out / f"rank{engine.rank()}.json").write_text(json.dumps({"steps": records, "loaded_partitioned":
                                                                   partitioned}))
        return result

    ppo.run = run_watched  # `rlhf.stages.run_stage` looks the stage's `run` up when it starts it
    return cli.main(argv)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    sys.exit(watched_cli(Path(args[0]), args[1:]))
