"""PPO's two trained models as the PPO stage builds them from the earlier stages' outputs: the one place
that knows how, for the stage (`rlhf.stages.ppo`: training, and rebuilding the actor to save it) and for
`rlhf export` (rebuilding a checkpoint's actor or critic before giving it the saved weights)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlhf import artifacts, models
from rlhf.config import PipelineConfig

ROLES = ("actor", "critic")


def policy_start(cfg: PipelineConfig, run_dir: Path, *, needed_by: str) -> str:
    """The dir the actor and its reference start from (and a critic with `ppo.critic_init: sft`): the SFT
    stage's `final/` in `run_dir`, a one-line error naming `needed_by` when it is missing; with
    `ppo.policy_init: base`, the base model (`model.name_or_path`, an alias resolved to its dir)."""
    if cfg.ppo.policy_init == "base":
        return models.resolve_model(cfg.model.name_or_path)
    return str(artifacts.stage_output(run_dir / "sft", "sft", needed_by=needed_by, config_path=cfg.source))


def policy_tokenizer(cfg: PipelineConfig, start_dir: str, *, padding_side: str = "right"):
    """The policy's tokenizer: the SFT output's own (saved with the chat template SFT trained on), or under
    `ppo.policy_init: base` the base model's (`model.tokenizer` when set) with `model.chat_template`
    applied, as the SFT stage would have."""
    m = cfg.model
    if cfg.ppo.policy_init == "base":
        return models.load_tokenizer(models.resolve_model(m.tokenizer or start_dir), padding_side=padding_side,
                                     trust_remote_code=m.trust_remote_code, chat_template=m.chat_template)
    return models.load_tokenizer(start_dir, trust_remote_code=m.trust_remote_code, padding_side=padding_side)


def load_trained(role: str, cfg: PipelineConfig, sft_dir: str, reward_dir: str | None, tokenizer, *,
                 dtype: str):
    """(model, the dir it was loaded from) for PPO's `role`:

    - actor: a causal LM from `sft_dir` (the policy's start, `policy_start`), with `model.lora`'s adapters
      when enabled;
    - critic: a 1-label scalar model from `sft_dir` (`ppo.critic_init: sft`) or the reward model's
      (`reward`, then `reward_dir` is needed), with adapters per `ppo.critic_lora` (None: as
      `model.lora.enabled`); a head the SFT model lacks starts fresh. The stage runs it inside
      `forwards.ScalarHead`.

    With the run's `trust_remote_code` and `allow_pickle`, in `dtype`. New adapters draw from torch's random
    stream, so the order of loads is part of a run's result. The stage loads each role inside
    `engine.partitioned_loading` (ZeRO-3 roles are partitioned as they load).
    """
    m = cfg.model
    common = {"tokenizer": tokenizer, "trust_remote_code": m.trust_remote_code, "allow_pickle": m.allow_pickle,
              "dtype": dtype}
    if role == "actor":
        return models.load_causal_lm(sft_dir, lora=models.lora_dict(m.lora), **common), sft_dir
    if role != "critic":
        raise ValueError(f"unknown PPO role {role!r}; expected one of {ROLES}")
    source = sft_dir if cfg.ppo.critic_init == "sft" else reward_dir
    lora = m.lora if cfg.ppo.critic_lora is None else dataclasses.replace(m.lora, enabled=cfg.ppo.critic_lora)
    return models.load_scalar_model(source, require_head=False, lora=models.lora_dict(lora), **common), source
