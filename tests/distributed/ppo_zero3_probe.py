"""Run under the deepspeed launcher (CPU ranks) by test_ppo_zero3_models.py; each rank writes OUT/rank<r>.json.

  ppo_zero3_probe.py trace CONFIG OUT        PPO for the config's steps; after each step, for the critic and
                                             the reward model: how often DeepSpeed's ZeRO-3 parameter
                                             coordinator started a forward (`reset_step`, called from its hook
                                             on the engine's top-level module) and whether its trace is complete
  ppo_zero3_probe.py load CONFIG OUT [whole] only `build_models`: this rank's peak resident memory while the
                                             four models load (up to the first `engine.wrap`), over what it held
                                             before (`whole`: with ZeRO-3's partitioned loading turned off, as
                                             a baseline)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


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
    records, counts = [], {}

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
        (out / f"rank{engine.rank()}.json").write_text(json.dumps(records))
    finally:
        engine.cleanup()


def load(config: str, out: Path, whole: bool) -> None:
    import contextlib

    import torch

    from rlhf import engine, models
    from rlhf.config import load_config
    from rlhf.stages import ppo

    cfg = load_config(config)
    engine.init_distributed()
    try:
        if whole:
            engine.partitioned_loading = lambda *args, **kwargs: contextlib.nullcontext()
        run_dir = cfg.run.dir
        tokenizer = models.load_tokenizer(str(run_dir / "sft" / "final"), padding_side="left")
        # DeepSpeed's import and its comm layer (hundreds of MB) come before the measurement in both modes
        engine.skip_cpu_shm_comm()
        import deepspeed
        import torch.distributed as dist

        deepspeed.comm.init_distributed(dist_backend=dist.get_backend())
        loaded = []  # this rank's peak (VmHWM) when the models are loaded: at the first engine.wrap
        wrap = engine.wrap

        def wrap_after_loading(*args, **kwargs):
            if not loaded:
                loaded.append(_rss_kib("VmHWM"))
            return wrap(*args, **kwargs)

        engine.wrap = wrap_after_loading
        engine.barrier()
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
        before = _rss_kib("VmRSS")
        built = ppo.build_models(cfg, str(run_dir / "sft" / "final"), str(run_dir / "reward" / "final"), tokenizer,
                                 torch.device("cpu"))
        peak = loaded[0]
        stages = {role: eng.zero_optimization_stage() for role, eng in built.items()
                  if hasattr(eng, "zero_optimization_stage")}
        (out / f"rank{engine.rank()}.json").write_text(json.dumps({"peak_kib": peak - before, "stages": stages}))
    finally:
        engine.cleanup()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
    mode, config, out = args[0], args[1], Path(args[2])
    if mode == "trace":
        trace(config, out)
    else:
        load(config, out, whole=args[3:] == ["whole"])
