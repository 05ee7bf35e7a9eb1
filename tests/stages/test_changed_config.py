"""A stage trained under one config is neither resumed nor kept as complete under another that changes its
weights: exit 2 naming the keys and `--restart`, and not a byte of the stage dir changes. Keys that only
change how a stage runs are accepted with one line."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import ROOT
from safetensors.torch import load_file

from rlhf import artifacts, cli
from rlhf.config import config_from_dict, save_resolved
from rlhf.errors import ConfigError
from rlhf.stages import pending_stages, run_pipeline, run_stage
from rlhf.stages.common import check_trained_config

pytestmark = pytest.mark.slow

STEPS = {"max_steps": 1, "save_steps": 1, "logging_steps": 1, "batch_size": 4, "eval_batch_size": 8}


def _raw(run_root: Path) -> dict:
    """The tiny config, SFT alone (one step, nothing held out), writing under run_root."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["run"]["output_dir"] = str(run_root / "runs")
    for key in ("sft", "preference", "prompts"):
        raw["data"][key] = str(ROOT / raw["data"][key])
    raw["sft"].update(STEPS)
    raw["data"]["eval_fraction"] = 0.0
    for key in ("final_stage", "reward"):  # no final_stage and no reward section: the file runs sft alone
        del raw[key]
    raw["logging"] = {"progress": False, "tensorboard": False, "plots": False}
    return raw


@pytest.fixture(scope="module")
def trained(tmp_path_factory, alias_cache) -> Path:
    """A finished one-step SFT stage, trained once for the module; tests copy it."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_CACHE", str(alias_cache))
        run_stage("sft", config_from_dict(_raw(root)))
    return root


def _copy(trained: Path, tmp_path: Path) -> dict:
    """The trained run under tmp_path, with its record pointing there (as if trained there), and its raw config."""
    shutil.copytree(trained / "runs", tmp_path / "runs")
    raw = _raw(tmp_path)
    save_resolved(config_from_dict(raw), tmp_path / "runs" / "tiny" / "sft" / artifacts.RESOLVED_CONFIG)
    save_resolved(config_from_dict(raw), tmp_path / "runs" / "tiny" / "sft" / "final" / artifacts.RESOLVED_CONFIG)
    return raw


def _files(stage_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(stage_dir)): p.read_bytes() for p in sorted(stage_dir.rglob("*")) if p.is_file()}


def test_a_finished_stage_rerun_with_another_learning_rate_exits_2_and_touches_nothing(trained, tmp_path,
                                                                                      rlhf_cache):
    raw = _copy(trained, tmp_path)
    cfg = config_from_dict(raw, overrides=["sft.learning_rate=1e-4"])
    before = _files(cfg.stage_dir("sft"))
    with pytest.raises(ConfigError) as err:
        run_stage("sft", cfg)
    message = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in message
    assert "sft.learning_rate 0.001 -> 0.0001" in message and "--restart" in message
    assert _files(cfg.stage_dir("sft")) == before  # no record rewritten, no stage.json removed, no claim left
    # An unfinished stage (a checkpoint, no stage.json) is not resumed under it either.
    (cfg.stage_dir("sft") / artifacts.MANIFEST).unlink()
    shutil.rmtree(cfg.stage_dir("sft") / "final")
    before = _files(cfg.stage_dir("sft"))
    with pytest.raises(ConfigError, match="sft.learning_rate"):
        run_stage("sft", cfg)
    assert _files(cfg.stage_dir("sft")) == before


def test_run_only_keys_may_differ_with_one_line(trained, tmp_path, rlhf_cache, caplog):
    raw = _copy(trained, tmp_path)
    cfg = config_from_dict(raw, overrides=["logging.jsonl=false", "sft.save_total_limit=3"])
    weights = load_file(str(cfg.stage_dir("sft") / "final" / "model.safetensors"))
    caplog.set_level(logging.INFO, logger="rlhf")
    run_stage("sft", cfg)
    accepted = [r.getMessage() for r in caplog.records if "are the same under both" in r.getMessage()]
    assert len(accepted) == 1 and "logging.jsonl, sft.save_total_limit differ" in accepted[0], accepted
    assert artifacts.is_complete(cfg.stage_dir("sft"))
    again = load_file(str(cfg.stage_dir("sft") / "final" / "model.safetensors"))
    assert again.keys() == weights.keys() and all((again[k] == weights[k]).all() for k in weights)


def test_a_plain_checkpoint_is_not_resumed_under_deepspeed_and_the_record_stays(trained, tmp_path, rlhf_cache):
    """A stage trained without DeepSpeed, re-run with it (as under the launcher): one line naming the
    checkpoint, the way out and `--restart`, before anything in the stage dir changes (its stage.json
    included). transformers alone fails with "Can't find a valid checkpoint" after the record is gone."""
    raw = _copy(trained, tmp_path)
    cfg = config_from_dict(raw, overrides=["deepspeed.enabled=true"])  # a run-only key: accepted by itself
    before = _files(cfg.stage_dir("sft"))
    with pytest.raises(ConfigError) as err:
        run_stage("sft", cfg)
    message = str(err.value)
    assert err.value.exit_code == 2 and "\n" not in message
    assert "checkpoint-1: written by a run without DeepSpeed" in message and "--restart" in message
    assert _files(cfg.stage_dir("sft")) == before


def test_the_pipeline_refuses_a_complete_stage_trained_under_other_values(trained, tmp_path, rlhf_cache, caplog,
                                                                          capsys):
    raw = _copy(trained, tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    stage_dir = config_from_dict(raw).stage_dir("sft")
    before = _files(stage_dir)
    with pytest.raises(ConfigError, match=r"sft\.packing False -> True.*--restart"):
        run_pipeline(config_from_dict(raw, overrides=["sft.packing=true"]))
    assert cli.main(["pipeline", "--config", str(config), "--set", "sft.packing=true", "--pending"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "error: " in out.err and "sft.packing" in out.err and "--restart" in out.err
    assert _files(stage_dir) == before
    # Only a run-only key changed: complete, so skipped, with the line.
    caplog.set_level(logging.INFO, logger="rlhf")
    assert cli.main(["pipeline", "--config", str(config), "--set", "logging.jsonl=false", "--pending"]) == 0
    assert capsys.readouterr().out.strip() == ""
    assert run_pipeline(config_from_dict(raw, overrides=["logging.jsonl=false"])) == []
    assert "sft: logging.jsonl differ from the config it was trained with" in caplog.text
    assert _files(stage_dir) == before


def test_a_finished_ppo_stage_is_checked_the_same_way(tmp_path, rlhf_cache, tiny_model_dir, tiny_reward_dir):
    raw = _raw(tmp_path)
    raw["final_stage"] = "ppo"
    cfg = config_from_dict(raw)
    for stage, model in (("sft", tiny_model_dir), ("reward", tiny_reward_dir), ("ppo", tiny_model_dir)):
        shutil.copytree(model, cfg.stage_dir(stage) / "final")
        save_resolved(cfg, cfg.stage_dir(stage) / artifacts.RESOLVED_CONFIG)
        artifacts.write_manifest(cfg.stage_dir(stage), stage, inputs={}, config_hash=cfg.hash(), metrics={},
                                 global_step=cfg.ppo.steps if stage == "ppo" else 1)
    before = _files(cfg.stage_dir("ppo"))
    with pytest.raises(ConfigError, match=r"ppo\.kl_coef 0\.05 -> 0\.2.*`rlhf ppo --restart`"):
        run_stage("ppo", config_from_dict(raw, overrides=["ppo.kl_coef=0.2"]))
    assert _files(cfg.stage_dir("ppo")) == before
    # The rollout backend draws the same tokens: accepted. An SFT change is the SFT stage's to refuse.
    assert check_trained_config(config_from_dict(raw, overrides=["ppo.generation=graph"]), "ppo") == [
        "ppo.generation"]
    assert check_trained_config(config_from_dict(raw, overrides=["sft.learning_rate=0.5"]), "ppo") == []
    # PPO may be given more steps (no step depends on the count), so the stage is pending again; not fewer
    # than its weights have had.
    assert pending_stages(config_from_dict(raw, overrides=["ppo.steps=6"])) == ["ppo"]
    with pytest.raises(ConfigError, match=r"ppo\.steps 4 -> 3"):
        pending_stages(config_from_dict(raw, overrides=["ppo.steps=3"]))
    assert _files(cfg.stage_dir("ppo")) == before
