"""The running state of one PPO run (`PPOContext`), built by `rlhf.stages.ppo.run`, stepped by `loop`,
saved and restored by `checkpoint`. Its own module so that those three import it and none of them each
other for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rlhf.config import PipelineConfig
from rlhf.engine import Engine
from rlhf.guards import NonFiniteGuard, catch_oom
from rlhf.ppo_math import KLController
from rlhf.stages.common import StageRun
from rlhf.stages.ppo.experience import PromptSampler, Scorer

if TYPE_CHECKING:
    from rlhf.generation import StaticDecoder


@dataclass
class PPOContext:
    """The models and the running state of one PPO run."""

    cfg: PipelineConfig
    stage: StageRun
    tokenizer: Any  # the policy's transformers tokenizer, left padding
    actor: Engine  # trained, with its optimizer
    critic: Engine | None  # trained, with its optimizer; None for a critic-free `ppo.advantage`
    ref: Engine | None  # frozen; None for a LoRA actor, whose reference is itself with adapters disabled
    scorer: Scorer
    kl_ctl: KLController
    rows: list[dict]  # the prompt rows
    sampler: PromptSampler
    reward_stats: dict[str, float] | None  # the reward model's score mean/std, for normalising scores
    device: torch.device  # the run's device (engine.device): every tensor the loop builds lives there
    guard: NonFiniteGuard
    decoder: StaticDecoder | None  # for ppo.generation static|graph; None: HF generate
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def watch(self, role: str):
        """Around one model's work: a CUDA out-of-memory error becomes one line naming the role (exit 3)."""
        return catch_oom("ppo", role, self.stage.ckpt_dir, self.cfg.source)


def make_guard(cfg: PipelineConfig, stage: StageRun) -> NonFiniteGuard:
    return NonFiniteGuard("ppo", cfg.run.on_nonfinite, cfg.run.max_consecutive_skips, stage.ckpt_dir,
                          "Lower ppo.learning_rate or raise ppo.kl_coef, or check the reward")
