"""Which pipelines train a reward stage: the ppo stage reads its output for the reward model (a
`reward_model` source of the reward: no `ppo.reward_fn`, and `ppo.rewards` unset or naming it) or a critic
initialised from it (`ppo.critic_init: reward` under `ppo.advantage: gae`), and for nothing else.
The rule is `PPOCfg.needs_reward_stage`; `PipelineConfig.stages`, and so `rlhf plan`, preflight,
`pending_stages`, `run_pipeline` and `rlhf pipeline --stages`, and `rlhf.stages.ppo.run` all follow it: without it there is no reward stage to train, check or require, and preflight says so in one line.
No model is trained."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from rlhf import artifacts, cli, plan, preflight, stages
from rlhf.config import config_from_dict, save_resolved
from rlhf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
FN = "ppo_reward:target_share"  # tests/stages/ppo_reward.py
ARCH = plan.Arch(source="test", lm_params=1000, cls_params=900, layers=2, hidden=8, intermediate=16, vocab=50,
                 kv_heads=2, head_dim=4, largest_layer=100)


@pytest.fixture(autouse=True)
def _quiet_launch_env(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "stages"))  # ppo.reward_fn's module, for preflight
    for key in ("NUM_GPUS", "NNODES", "HOSTFILE", "LAUNCHER", "MASTER_ADDR", "LOCAL_RANK", "RLHF_GPU_MEM_GIB"):
        monkeypatch.delenv(key, raising=False)


def _raw(tmp_path: Path, **ppo) -> dict:
    """configs/tiny.yaml under tmp_path with these `ppo` settings, and no preference data when the reward
    stage is not needed (so a check of the reward stage would block)."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    for key in ("sft", "preference", "prompts"):
        raw["data"][key] = str(ROOT / raw["data"][key])
    raw["ppo"].update(ppo)
    if not config_from_dict(raw).ppo.needs_reward_stage:
        del raw["data"]["preference"]
    return raw


@pytest.mark.parametrize("ppo, reward_stage", [
    ({}, True),                                                                # the reward model scores
    ({"reward_fn": FN}, True),                                                 # a critic from the reward model
    ({"reward_fn": FN, "critic_init": "sft"}, False),
    ({"advantage": "grpo", "samples_per_prompt": 4}, True),                    # the reward model scores
    ({"advantage": "grpo", "samples_per_prompt": 4, "reward_fn": FN}, False),  # no critic at all
    ({"advantage": "rloo", "samples_per_prompt": 2, "reward_fn": FN, "critic_init": "sft"}, False),
    ({"advantage": "grpo", "samples_per_prompt": 4, "rewards": [{"source": FN}]}, False),
    ({"advantage": "grpo", "samples_per_prompt": 4, "rewards": [{"source": FN}, {"source": "reward_model"}]}, True),
])
def test_the_pipeline_has_a_reward_stage_only_when_ppo_reads_it(tmp_path, ppo, reward_stage):
    cfg = config_from_dict(_raw(tmp_path, **ppo))
    assert cfg.ppo.needs_reward_stage is reward_stage
    roles = [m.role for m in plan.estimate(cfg, gpus=1, arch=ARCH).models]
    assert ("reward" in roles) is cfg.ppo.needs_reward_model and ("critic" in roles) is cfg.ppo.uses_critic
    expected = ["sft", "reward", "ppo"] if reward_stage else ["sft", "ppo"]
    assert cfg.stages == expected
    assert stages.pending_stages(cfg) == expected  # nothing trained yet


def test_preflight_says_why_and_checks_no_reward_stage(tmp_path, caplog, capsys, rlhf_cache):
    raw = _raw(tmp_path, advantage="grpo", samples_per_prompt=4, reward_fn=FN)
    cfg = config_from_dict(raw, source="cfg.yaml")
    caplog.set_level(logging.INFO, logger="rlhf")
    assert preflight.check(cfg) == []  # no data.preference, yet no data.not_set for the reward stage
    lines = [r.getMessage() for r in caplog.records if "reward stage not needed" in r.getMessage()]
    assert lines == ["cfg.yaml: reward stage not needed: ppo.reward_fn scores and ppo.advantage: grpo has no "
                     "critic; the pipeline skips it"]
    programs = config_from_dict(_raw(tmp_path, advantage="rloo", samples_per_prompt=2, rewards=[{"source": FN}]),
                                source="programs.yaml")
    assert programs.stages == ["sft", "ppo"] and preflight.check(programs) == []
    assert ("programs.yaml: reward stage not needed: ppo.rewards has no reward_model source and ppo.advantage: "
            "rloo has no critic; the pipeline skips it") in caplog.text
    # the ppo stage started on its own needs the sft output only
    sft = cfg.stage_dir("sft")
    (sft / "final").mkdir(parents=True)
    artifacts.write_manifest(sft, "sft", inputs={}, config_hash="t", metrics={})
    assert preflight.check(cfg, ["ppo"], standalone=True) == []
    # the same from the command line, and `--pending` lists no reward stage
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["preflight", "--config", str(path)]) == 0
    assert cli.main(["pipeline", "--config", str(path), "--pending"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ppo"


def test_a_gae_critic_from_the_reward_model_still_needs_the_reward_stage(tmp_path, caplog, rlhf_cache):
    # a program scores, but the critic starts from the reward model: its data is checked, and the ppo stage
    # started on its own needs the reward stage's output
    raw = _raw(tmp_path, reward_fn=FN)
    del raw["data"]["preference"]
    cfg = config_from_dict(raw, source="cfg.yaml")
    (blocker,) = preflight.check(cfg)
    assert blocker.code == "data.not_set" and "the reward stage needs preference pairs" in blocker.message
    sft = cfg.stage_dir("sft")
    (sft / "final").mkdir(parents=True)
    artifacts.write_manifest(sft, "sft", inputs={}, config_hash="t", metrics={})
    (missing,) = preflight.check(cfg, ["ppo"], standalone=True)
    assert missing.code == "stage.input_missing" and "the reward stage has not finished" in missing.message
    # with critic_init: sft the critic starts from the SFT model, and the line says that
    caplog.set_level(logging.INFO, logger="rlhf")
    sft_init = config_from_dict(raw, source="cfg.yaml", overrides=["ppo.critic_init=sft"])
    assert preflight.check(sft_init) == [] and preflight.check(sft_init, ["ppo"], standalone=True) == []
    assert ("cfg.yaml: reward stage not needed: ppo.reward_fn scores and the critic starts from the SFT model "
            "(ppo.critic_init: sft); the pipeline skips it") in caplog.text


def test_a_reward_stage_the_pipeline_does_not_need_is_neither_run_nor_checked(tmp_path, monkeypatch, caplog,
                                                                              rlhf_cache):
    # a reward stage left by an earlier run under other settings would stop a pipeline that trains one;
    # here nothing reads it, so the pipeline runs sft and ppo alone and never looks at it
    raw = _raw(tmp_path, advantage="grpo", samples_per_prompt=4, reward_fn=FN)
    cfg = config_from_dict(raw, source="cfg.yaml")
    other = config_from_dict(_raw(tmp_path), overrides=["reward.learning_rate=0.5"])
    reward = cfg.stage_dir("reward")
    (reward / "final").mkdir(parents=True)
    save_resolved(other, reward / artifacts.RESOLVED_CONFIG)
    artifacts.write_manifest(reward, "reward", inputs={}, config_hash="t", metrics={})
    ran = []
    monkeypatch.setattr(stages, "run_stage", lambda stage, cfg, **kw: ran.append(stage) or stage)
    caplog.set_level(logging.INFO, logger="rlhf")
    assert stages.run_pipeline(cfg) == ["sft", "ppo"] and ran == ["sft", "ppo"]
    assert stages.run_pipeline(cfg, restart=True) == ["sft", "ppo"]
    assert "reward: complete" not in caplog.text
    gae = config_from_dict(_raw(tmp_path), source="cfg.yaml")  # GAE reads it: refused as trained otherwise
    with pytest.raises(ConfigError, match=r"reward\.learning_rate 0\.5 -> 0\.001"):
        stages.pending_stages(gae)


def test_under_a_launcher_the_pipeline_runs_a_stage_pending_on_any_rank(tmp_path, monkeypatch, rlhf_cache):
    # node-local run dirs: this rank holds sft complete, another rank's node lacks it; every rank runs it
    from rlhf import engine

    cfg = config_from_dict(_raw(tmp_path, advantage="grpo", samples_per_prompt=4, reward_fn=FN), source="cfg.yaml")
    sft = cfg.stage_dir("sft")
    (sft / "final").mkdir(parents=True)
    save_resolved(cfg, sft / artifacts.RESOLVED_CONFIG)
    artifacts.write_manifest(sft, "sft", inputs={}, config_hash="t", metrics={})
    assert stages.pending_stages(cfg) == ["ppo"]
    monkeypatch.setattr(engine, "all_gather_object", lambda mine: [mine, ["sft", "ppo"]])  # rank 1's list
    ran = []
    monkeypatch.setattr(stages, "run_stage", lambda stage, cfg, **kw: ran.append(stage) or stage)
    assert stages.run_pipeline(cfg) == ["sft", "ppo"] and ran == ["sft", "ppo"]


def test_preflight_imports_every_program_of_the_reward(tmp_path, rlhf_cache):
    raw = _raw(tmp_path, advantage="grpo", samples_per_prompt=4,
               rewards=[{"source": FN}, {"source": "no_such_module:score"}, {"source": "math:pi"}])
    blockers = preflight.check(config_from_dict(raw, source="cfg.yaml"))
    assert [b.message.split(" (")[0] for b in blockers] == [
        "cfg.yaml: ppo.rewards: cannot import 'no_such_module:score'", "cfg.yaml: ppo.rewards: 'math:pi' is not callable"]
