"""PPO's two trained models as the PPO stage builds them from the earlier stages' outputs: the one place
that knows how, for the stage (`rlhf.stages.ppo`: training, and rebuilding the actor to save it) and for
`rlhf export` (rebuilding a checkpoint's actor or critic before giving it the saved weights)."""

from __future__ import annotations

import dataclasses

from rlhf import models
from rlhf.config import PipelineConfig

ROLES = ("actor", "critic")


def load_trained(role: str, cfg: PipelineConfig, sft_dir: str, reward_dir: str | None, tokenizer, *,
                 dtype: str):
    """(model, the dir it was loaded from) for PPO's `role`:

    - actor: a causal LM from the SFT output, with `model.lora`'s adapters when enabled;
    - critic: a 1-label scalar model from the SFT output (`ppo.critic_init: sft`) or the reward model's
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
