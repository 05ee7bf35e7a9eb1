"""Checks that run before any stage spends compute, and before any model weights load.

Each problem is a typed `Blocker` printed as one line. `rlhf preflight` exits 2 when any is found; every
stage runs the same checks for itself first.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rlhf import artifacts
from rlhf.config import PipelineConfig
from rlhf.errors import RlhfError

# Which data each stage reads: (config key, data kind).
STAGE_DATA = {
    "sft": ("sft", "sft"),
    "reward": ("preference", "preference"),
    "dpo": ("preference", "preference"),
    "orpo": ("preference", "preference"),
    "ppo": ("prompts", "prompt"),
}
# Earlier stages whose outputs a stage reads.
STAGE_INPUTS = {"sft": (), "reward": (), "ppo": ("sft", "reward"), "dpo": ("sft",), "orpo": ()}


@dataclass(frozen=True)
class Blocker:
    code: str
    """Stable identifier, e.g. `data.missing`, `model.not_found`, `stage.input_missing`."""
    message: str
    """One line: names the file, key or path, and says what to do."""

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


def data_source(cfg: PipelineConfig, stage: str) -> tuple[str | None, str, str]:
    """(path, config key, kind) of the data a stage trains on, after the documented fallbacks."""
    key, kind = STAGE_DATA[stage]
    path = getattr(cfg.data, key)
    if path is None and key == "sft" and cfg.data.preference:
        return cfg.data.preference, "data.preference", kind  # SFT on the chosen responses
    if path is None and key == "prompts" and cfg.data.preference:
        return cfg.data.preference, "data.preference", kind  # PPO on the preference prompts
    return path, f"data.{key}", kind


def check(cfg: PipelineConfig, stages: list[str] | None = None, *, standalone: bool = False) -> list[Blocker]:
    """All blockers for running `stages` (default: the file's pipeline).

    standalone=True means each stage is started on its own, so the outputs of earlier stages must
    already exist; in a pipeline run they are produced on the way.
    """
    stages = cfg.stages if stages is None else stages
    blockers: list[Blocker] = []
    if not stages:
        blockers.append(Blocker("config.no_stages", f"{cfg.source}: nothing to run; set final_stage (ppo, dpo or "
                                "orpo) or add an `sft` or `reward` section"))
    for stage in stages:
        blockers += _check_data(cfg, stage)
        blockers += _check_inputs(cfg, stage, planned=[] if standalone else stages[: stages.index(stage)])
    blockers += _check_models(cfg, stages)
    blockers += _check_packages(cfg, stages)
    blockers += _check_output(cfg)
    return blockers


def _check_data(cfg: PipelineConfig, stage: str) -> list[Blocker]:
    from rlhf import data

    path, key, kind = data_source(cfg, stage)
    if path is None:
        need = "preference pairs (prompt, chosen, rejected)" if kind == "preference" else f"{kind} data"
        return [Blocker("data.not_set", f"{cfg.source}: {key} is not set; the {stage} stage needs {need}")]
    out = []
    for source in (path, _eval_source(cfg, key)):
        if source is None:
            continue
        try:
            data.check_source(source, kind, split=cfg.data.split, bad_rows=cfg.data.bad_rows)
        except RlhfError as err:
            out.append(Blocker("data.invalid", f"{stage}: {err}"))
    return out


def _eval_source(cfg: PipelineConfig, key: str) -> str | None:
    return getattr(cfg.data, key.split(".")[-1] + "_eval", None)


def _check_inputs(cfg: PipelineConfig, stage: str, planned: list[str]) -> list[Blocker]:
    out = []
    needed = list(STAGE_INPUTS[stage])
    if stage == "reward" and cfg.reward.base_model is None and "sft" in cfg.present:
        needed.append("sft")
    if stage == "ppo" and cfg.ppo.reward_fn and cfg.ppo.critic_init == "sft":
        needed.remove("reward")  # a Python reward and an SFT-initialised critic need no reward model
    for earlier in needed:
        if earlier in planned:
            continue
        try:
            artifacts.stage_output(cfg.stage_dir(earlier), earlier, needed_by=f"the {stage} stage",
                                   config_path=cfg.source)
        except RlhfError as err:
            out.append(Blocker("stage.input_missing", str(err)))
    return out


def _check_models(cfg: PipelineConfig, stages: list[str]) -> list[Blocker]:
    from rlhf import models

    names = [("model.name_or_path", cfg.model.name_or_path)]
    if "reward" in stages and cfg.reward.base_model:
        names.append(("reward.base_model", cfg.reward.base_model))
    out = []
    for key, name in names:
        problem = models.check_resolvable(name, allow_pickle=cfg.model.allow_pickle)
        if problem:
            out.append(Blocker("model.unusable", f"{cfg.source}: {key}: {problem}"))
    return out


def _check_packages(cfg: PipelineConfig, stages: list[str]) -> list[Blocker]:
    from rlhf import engine

    out = []
    if engine.use_deepspeed(cfg.deepspeed) and importlib.util.find_spec("deepspeed") is None:
        out.append(Blocker("package.missing", "deepspeed is not installed but DeepSpeed is on (launcher or "
                           "deepspeed.enabled); `pip install deepspeed` or set deepspeed.enabled: false"))
    if cfg.model.lora.enabled and importlib.util.find_spec("peft") is None:
        out.append(Blocker("package.missing", "peft is not installed but model.lora.enabled is true; "
                           "`pip install peft`"))
    if "ppo" in stages and cfg.ppo.reward_fn:
        out += _check_reward_fn(cfg)
    return out


def _check_reward_fn(cfg: PipelineConfig) -> list[Blocker]:
    module, _, name = cfg.ppo.reward_fn.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        return [Blocker("ppo.reward_fn", f"{cfg.source}: ppo.reward_fn: cannot import '{cfg.ppo.reward_fn}' ({err})")]
    if not callable(fn):
        return [Blocker("ppo.reward_fn", f"{cfg.source}: ppo.reward_fn: '{cfg.ppo.reward_fn}' is not callable")]
    return []


def _check_output(cfg: PipelineConfig) -> list[Blocker]:
    run_dir = cfg.run.dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        return [Blocker("output.unwritable", f"{run_dir}: output dir is not writable ({err.strerror}); "
                        "set run.output_dir to a writable place")]
    return []


def format_blockers(blockers: list[Blocker]) -> str:
    return "\n".join(f"blocked: {b}" for b in blockers)


def check_or_raise(cfg: PipelineConfig, stages: list[str], *, standalone: bool) -> None:
    """Used by every stage before it loads anything heavy."""
    blockers = check(cfg, stages, standalone=standalone)
    if blockers:
        raise PreflightError(blockers)


class PreflightError(RlhfError):
    def __init__(self, blockers: list[Blocker]):
        super().__init__(format_blockers(blockers))
        self.blockers = blockers


def writable(path: str | Path) -> bool:
    return os.access(Path(path), os.W_OK)
