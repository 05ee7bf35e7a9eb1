"""PPO checkpoints: what a killed or preempted run resumes from, exactly where it stopped.

checkpoint-<step>/ holds actor/ and critic/ (none for a critic-free run) (weights, optimizer, scheduler, through the engines),
trainer_state.json (step, KL controller, reward stats, prompt sampler position) and each rank's random
state; its completion marker is written last, and only the last KEEP_CHECKPOINTS are kept.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from rlhf import artifacts, engine
from rlhf.replicate import replicate
from rlhf.stages.common import save_failed

if TYPE_CHECKING:
    from rlhf.stages.ppo.context import PPOContext

log = logging.getLogger("rlhf")
KEEP_CHECKPOINTS = 2


def rng_state(device) -> tuple[dict, dict[str, Tensor]]:
    """This rank's random state: Python and NumPy (JSON-able) and torch's CPU generator, plus the CUDA
    generator of `device` when it is a GPU (sampling and shuffles on the GPU draw from it)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, Tensor], device) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda"], device)
    elif "cuda" in tensors or device.type == "cuda":
        log.warning("ppo: resuming on %s from a checkpoint saved %s a GPU: the GPU's random stream starts "
                    "from the seed", device, "on" if "cuda" in tensors else "without")


def save_checkpoint(ctx: PPOContext) -> Path:
    """checkpoint-<step>/: actor/ and critic/ (weights, optimizer, scheduler), trainer_state.json
    (step, KL controller, reward stats, sampler position) and per-rank RNG states; then the
    completion marker, and only the last KEEP_CHECKPOINTS are kept. Collective."""
    from safetensors.torch import save_file

    path = ctx.stage.ckpt_dir / f"checkpoint-{ctx.step}"
    if engine.is_main() and path.exists():
        shutil.rmtree(path)
    engine.barrier()
    try:
        engine.save_engine(ctx.actor, path / "actor")
        if ctx.critic is not None:  # a critic-free run has none
            engine.save_engine(ctx.critic, path / "critic")
        plain, tensors = rng_state(ctx.device)
        rank = engine.rank()
        artifacts.write_json_atomic(path / f"rng-{rank}.json", plain)
        save_file(tensors, str(path / f"rng-{rank}.safetensors"))
        if engine.is_main():
            artifacts.write_json_atomic(path / "trainer_state.json", {
                "step": ctx.step, "kl_controller": ctx.kl_ctl.state_dict(), "reward_stats": ctx.reward_stats,
                "sampler": ctx.sampler.state_dict(), "world_size": engine.world_size()})
        engine.barrier()
        if engine.is_main():
            artifacts.mark_checkpoint_complete(path, ctx.step)
    except Exception as err:  # disk full, file-size limit, unwritable dir: one line, previous checkpoint kept
        failure = save_failed(path, "the checkpoint", err, artifacts.latest_checkpoint(ctx.stage.ckpt_dir))
        if failure is None:
            raise
        raise failure from err
    if engine.is_main():
        for old in artifacts.list_checkpoints(ctx.stage.ckpt_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    replicate(ctx.cfg.run.dir, [path], prune=ctx.stage.ckpt_dir)
    return path


def load_checkpoint(ctx: PPOContext, path: Path) -> None:
    from safetensors.torch import load_file

    engine.load_engine(ctx.actor, path / "actor")
    if ctx.critic is not None:
        engine.load_engine(ctx.critic, path / "critic")
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    ctx.step = int(state["step"])
    ctx.kl_ctl.load_state_dict(state["kl_controller"])
    ctx.sampler.load_state_dict(state["sampler"])
    if state.get("reward_stats") is not None:
        ctx.reward_stats = state["reward_stats"]
    rng = path / f"rng-{engine.rank()}.json"
    if rng.is_file():  # absent when resuming with more ranks than saved: those start from the seed
        set_rng_state(json.loads(rng.read_text(encoding="utf-8")), load_file(str(rng.with_suffix(".safetensors"))),
                      ctx.device)
