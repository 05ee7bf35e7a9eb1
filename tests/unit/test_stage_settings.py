"""Which config keys a stage's weights depend on (`rlhf.config.changed_settings`), and errors in `--set`
overrides blamed on `--set`, not on the file."""

from __future__ import annotations

import fnmatch

import pytest

from rlhf.config import RUN_ONLY_KEYS, changed_settings, config_from_dict, load_config, stage_settings
from rlhf.errors import ConfigError

BASE = {"data": {"sft": "s.jsonl", "preference": "p.jsonl", "prompts": "q.jsonl"}, "final_stage": "ppo"}


def _changed(stage: str, *overrides: str, base: dict = BASE) -> tuple[list[str], list[str]]:
    return changed_settings(config_from_dict(base), config_from_dict(base, overrides=list(overrides)), stage)


def test_result_keys_and_run_only_keys_are_told_apart():
    assert _changed("sft", "sft.learning_rate=1e-4", "sft.save_steps=7", "logging.progress=false") == (
        ["sft.learning_rate"], ["logging.progress", "sft.save_steps"])
    assert _changed("ppo", "ppo.generation=graph", "deepspeed.actor.zero_stage=3", "run.collective_timeout_s=60",
                    "ppo.kl_ceiling=9") == (
        [], ["deepspeed.actor.zero_stage", "ppo.generation", "ppo.kl_ceiling", "run.collective_timeout_s"])
    assert _changed("dpo", "run.seed=1", "model.lora.r=4", "deepspeed.config_file=ds.json") == (
        ["deepspeed.config_file", "model.lora.r", "run.seed"], [])


def test_ppo_steps_may_grow_to_no_fewer_than_the_steps_trained():
    trained, more = config_from_dict({"ppo": {"steps": 10}}), config_from_dict({"ppo": {"steps": 20}})
    assert changed_settings(trained, more, "ppo", trained_step=10) == ([], ["ppo.steps"])
    assert changed_settings(more, trained, "ppo", trained_step=10) == ([], ["ppo.steps"])  # stopped at 10 of 20
    assert changed_settings(more, trained, "ppo", trained_step=11) == (["ppo.steps"], [])
    assert changed_settings(trained, more, "ppo") == (["ppo.steps"], [])  # no step known
    # A Trainer stage's schedule spans its max_steps.
    assert _changed("sft", "sft.max_steps=99") == (["sft.max_steps"], [])


def test_a_stage_depends_on_the_data_it_reads_and_not_on_other_stages_sections():
    assert _changed("sft", "data.prompts=other.jsonl", "data.preference=other.jsonl", "ppo.kl_coef=0.5",
                    "data.max_prompt_length=32", "data.verbosity=block") == ([], [])
    assert _changed("ppo", "data.prompts=other.jsonl", "data.max_prompt_length=32", "sft.learning_rate=1") == (
        ["data.max_prompt_length", "data.prompts"], [])
    # SFT falls back to the chosen side of the preference set when data.sft is unset.
    no_sft = {**BASE, "data": {"preference": "p.jsonl"}}
    assert _changed("sft", "data.preference=other.jsonl", base=no_sft) == (["data.preference"], [])
    # A key mapping is carried by each source, so it counts where a source the stage reads carries it.
    assert _changed("reward", "data.columns.prompt=question") == (["data.preference"], [])


def test_how_a_reward_server_is_reached_may_change_and_what_scores_may_not():
    def cfg(**server):
        return config_from_dict({**BASE, "ppo": {"rewards": [{"source": "reward_model"},
                                                             {"url": "http://rm:8000", **server}]}})

    assert changed_settings(cfg(), cfg(timeout_s=5, retries=9, token_env="RM_TOKEN"), "ppo") == (
        [], ["ppo.rewards.1.retries", "ppo.rewards.1.timeout_s", "ppo.rewards.1.token_env"])
    assert changed_settings(cfg(), cfg(url="http://other:8000", weight=2.0), "ppo") == (
        ["ppo.rewards.1.url", "ppo.rewards.1.weight"], [])
    fewer = config_from_dict({**BASE, "ppo": {"rewards": [{"source": "reward_model"}]}})
    assert "ppo.rewards.1.url" in changed_settings(cfg(), fewer, "ppo")[0]  # a source dropped


def test_every_run_only_pattern_names_a_key():
    served = config_from_dict({**BASE, "ppo": {"rewards": [{"url": "http://rm:8000"}]}})
    keys = {key for stage in ("sft", "ppo", "dpo") for key in stage_settings(config_from_dict(BASE), stage)}
    keys |= set(stage_settings(served, "ppo"))
    assert [p for p in RUN_ONLY_KEYS if not any(fnmatch.fnmatchcase(k, p) for k in keys)] == []


@pytest.mark.parametrize("overrides, line", [
    (["sft.batch_size=eight"], "--set sft.batch_size: expected int, got str 'eight'"),
    (["dpo.beta=-1"], "--set dpo.beta: must be > 0 (got -1.0)"),
    (["sft.learnig_rate=1"], "--set: unknown key 'sft.learnig_rate' (did you mean 'sft.learning_rate'?)"),
    (["model=gpt2"], "--set model: expected a mapping of keys, got str"),
])
def test_a_bad_override_is_blamed_on_set_and_the_files_own_errors_on_the_file(tmp_path, overrides, line):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  eval_batch_size: many\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(err.value).splitlines() == [f"{path}: sft.eval_batch_size: expected int, got str 'many'", line]
