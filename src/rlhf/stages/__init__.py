"""Stages: each module exposes `run(cfg, restart=False) -> StageResult`.

`run_stage` checks preflight blockers for one stage started on its own; `run_pipeline` runs the stages
the config needs in order (`PipelineConfig.stages`: no reward stage for a ppo stage that reads none),
skipping complete ones (their `stage.json` exists) and resuming the rest from their last checkpoint. A
stage whose weights were trained under other values of keys they depend on is neither skipped nor resumed
(`common.check_trained_config`). A stage claims its dir before it writes there (`rlhf.claims`): a second
start on a live run is refused, a dead run's claim is taken over.
"""

from __future__ import annotations

import importlib
import logging

from rlhf import artifacts, claims, engine, preflight, rollcall, tracking
from rlhf.config import PipelineConfig

log = logging.getLogger("rlhf")

MODULES = {"sft": "rlhf.stages.sft", "reward": "rlhf.stages.reward", "ppo": "rlhf.stages.ppo",
           "dpo": "rlhf.stages.dpo", "orpo": "rlhf.stages.orpo"}


def _module(stage: str):
    try:
        return importlib.import_module(MODULES[stage])
    except ModuleNotFoundError as err:
        if err.name == MODULES[stage]:
            from rlhf.errors import ConfigError

            raise ConfigError(f"the {stage} stage is not available in this version of rlhf") from None
        raise


def run_stage(stage: str, cfg: PipelineConfig, *, restart: bool = False, standalone: bool = True):
    """Run one stage after its preflight checks. Returns its StageResult.

    Under a launcher every rank checks its own view (its disk, its GPUs) and the ranks decide together in
    the roll call (`rlhf.rollcall`), so a blocker on one node stops all of them at once instead of leaving
    the others waiting for it at the rendezvous.
    """
    blockers = preflight.check(cfg, [stage], standalone=standalone)
    if not blockers:
        _materialize_aliases(cfg)
    engine.init_distributed(cfg.run.collective_timeout_s)
    rollcall.roll_call(blockers)
    try:
        return _module(stage).run(cfg, restart=restart)
    finally:  # error, SIGTERM stop or done: the stage dir is free again (a SIGKILL leaves the claim behind)
        tracking.close_open(ok=False)  # still open only when the stage ended by an error
        claims.release_all()


def _materialize_aliases(cfg: PipelineConfig) -> None:
    """Build alias caches before the process group exists: once it does, transformers writes model files
    from global rank 0 only, so a build on another rank (or another node's local cache) would be empty."""
    from rlhf import models

    for name in (cfg.model.name_or_path, cfg.model.tokenizer, cfg.reward.base_model):
        if name in models.ALIASES:
            models.resolve_model(name)


def pending_stages(cfg: PipelineConfig) -> list[str]:
    """The config's stages that are not complete, in order. First every
    stage holding trained weights is checked against `cfg` (`common.check_trained_config`), so one trained
    under other values of keys its weights depend on stops the pipeline before anything runs, instead of
    being skipped."""
    from rlhf.config import GROWING_STEPS
    from rlhf.stages.common import check_trained_config

    pending = []
    for stage in cfg.stages:
        accepted = check_trained_config(cfg, stage)
        # A complete stage whose step count was raised has steps left to train.
        if not artifacts.is_complete(cfg.stage_dir(stage)) or GROWING_STEPS.get(stage) in accepted:
            pending.append(stage)
        elif accepted:
            log.info("%s: %s differ from the config it was trained with, but its weights are the same under "
                     "both; kept as complete", stage, ", ".join(accepted))
    return pending


def agreed_pending(cfg: PipelineConfig, pending: list[str]) -> list[str]:
    """The stages pending on any rank, in the config's order: under a launcher every rank runs the same
    stages, also where node-local run dirs differ (a stage one node lacks runs on all of them, as
    `stages/pipeline.sh` decides it). Collective; in one process, `pending` itself."""
    anywhere = {stage for mine in engine.all_gather_object(pending) for stage in mine}
    return [stage for stage in cfg.stages if stage in anywhere]


def run_pipeline(cfg: PipelineConfig, *, restart: bool = False) -> list:
    """All stages of the file, in order; complete ones are skipped unless restart is set. Which stages run
    is agreed over the ranks (`agreed_pending`)."""
    stages = cfg.stages
    mine = stages if restart else pending_stages(cfg)
    preflight.check_or_raise(cfg, stages, standalone=False)  # says why a stage is left out
    _materialize_aliases(cfg)  # before the process group, as in run_stage
    engine.init_distributed(cfg.run.collective_timeout_s)  # under a launcher; run_stage finds it made
    pending = agreed_pending(cfg, mine)
    results = []
    for stage in stages:
        if stage not in pending:
            log.info("%s: complete (%s exists), skipping", stage, cfg.stage_dir(stage) / artifacts.MANIFEST)
            continue
        log.info("%s: starting", stage)
        results.append(run_stage(stage, cfg, restart=restart, standalone=True))
    return results
