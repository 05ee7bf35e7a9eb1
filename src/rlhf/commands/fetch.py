"""`rlhf fetch`: put every model the given stages read from outside the run on this machine, once, before
a launch starts its ranks.

Without it each rank resolves the models itself as it starts: eight ranks of a node wait in turn on the
alias cache's lock, or download one hub id at once. The stage scripts (`stages/lib.sh`) run this on every
node before its launcher, so the ranks find everything in place. Outputs of earlier stages are the run's
own and are not fetched; neither is anything the stages would not read (a complete stage's base model).
"""

from __future__ import annotations

import logging

from rlhf import models
from rlhf.config import PipelineConfig
from rlhf.errors import ModelError

log = logging.getLogger("rlhf")


def models_read(cfg: PipelineConfig, stages: list[str]) -> list[tuple[str, str]]:
    """(config key, name) of each model `stages` load from outside the run, as the stages choose them: sft
    and orpo start from model.name_or_path; reward from reward.base_model, else the SFT output when the file
    has SFT, else model.name_or_path (`stages.reward.base_model`); ppo from the SFT output, or with
    `ppo.policy_init: base` from model.name_or_path; dpo from the SFT output. model.tokenizer, when set,
    serves every stage."""
    reads_base = bool({"sft", "orpo"} & set(stages)) or (
        "reward" in stages and not cfg.reward.base_model and "sft" not in cfg.present) or (
        "ppo" in stages and cfg.ppo.policy_init == "base")
    names = [("model.name_or_path", cfg.model.name_or_path)] if reads_base else []
    if "reward" in stages and cfg.reward.base_model:
        names.append(("reward.base_model", cfg.reward.base_model))
    if cfg.model.tokenizer and stages:
        names.append(("model.tokenizer", cfg.model.tokenizer))
    return names


def run(cfg: PipelineConfig, stages: list[str]) -> list[str]:
    """Fetch what `stages` read (`models_read`); one line per model: its key, name and where it is now."""
    lines = []
    for key, name in models_read(cfg, stages):
        try:
            where = models.fetch_model(name, allow_pickle=cfg.model.allow_pickle,
                                       tokenizer_only=key == "model.tokenizer")
        except ModelError as err:
            raise ModelError(f"{cfg.source}: {key}: {err}") from None
        lines.append(f"fetch: {key} {name}: {where}" if where != name else f"fetch: {key} {name}: ready")
    if not lines:
        lines.append(f"fetch: stages {', '.join(stages) or 'none'} read no model from outside the run")
    return lines
