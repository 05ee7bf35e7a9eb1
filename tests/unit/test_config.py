"""Config schema: types, ranges, unknown keys with suggestions, --set overrides, shipped files; the coercer
on a schema of its own."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from rlhf import coerce
from rlhf.config import PipelineConfig, config_from_dict, load_config, save_resolved
from rlhf.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.stages, f"{path} runs no stage"


@pytest.mark.parametrize("raw, message", [
    ({"sft": {"learnig_rate": 1e-5}}, "unknown key 'sft.learnig_rate' (did you mean 'sft.learning_rate'?)"),
    ({"modle": {}}, "unknown key 'modle' (did you mean 'model'?)"),
    ({"dpo": {"beta": -0.1}}, "dpo.beta: must be > 0"),
    ({"orpo": {"beta": 0}}, "orpo.beta: must be > 0"),
    ({"sft": {"learning_rate": 0}}, "sft.learning_rate: must be > 0"),
    ({"ppo": {"clip_range": 1.5}}, "ppo.clip_range: must be in (0, 1)"),
    ({"ppo": {"mini_batch_size": 3}}, "ppo.mini_batch_size: must divide rollout_batch_size (16)"),
    ({"sft": {"batch_size": "eight"}}, "sft.batch_size: expected int, got str 'eight'"),
    ({"sft": {"batch_size": 2.5}}, "sft.batch_size: expected int"),
    ({"final_stage": "rlaif"}, "final_stage: must be one of 'ppo', 'dpo', 'orpo'"),
    ({"deepspeed": {"actor": {"zero_stage": 4}}}, "deepspeed.actor.zero_stage: must be 0, 1, 2 or 3"),
    ({"deepspeed": {"offload_param": True, "zero_stage": 2}}, "deepspeed.offload_param: needs zero_stage 3"),
    ({"data": {"bad_rows": "ignore"}}, "data.bad_rows: must be one of 'error', 'skip'"),
    ({"model": "gpt2"}, "model: expected a mapping of keys, got str"),
    ({"logging": {"tensorboard": "yes please"}}, "logging.tensorboard: expected bool"),
])
def test_bad_values_name_file_and_key(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw, source="my.yaml")
    text = str(err.value)
    assert text.startswith("my.yaml: ") and message in text and "\n" not in text


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads `1e-5` as a string; the schema converts it for float fields.
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  learning_rate: 1e-5\n")
    assert load_config(path).sft.learning_rate == pytest.approx(1e-5)


def test_overrides_are_typed_and_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("final_stage: dpo\n")
    cfg = load_config(path, ["dpo.beta=0.5", "run.name=x", "deepspeed.actor.offload_param=true", "data.sft=a.jsonl"])
    assert cfg.dpo.beta == 0.5 and cfg.run.name == "x" and cfg.deepspeed.actor.offload_param is True
    assert cfg.data.sft == "a.jsonl"
    with pytest.raises(ConfigError, match="dpo.beta: must be > 0"):
        load_config(path, ["dpo.beta=-1"])
    with pytest.raises(ConfigError, match="unknown key 'dpo.bta'"):
        load_config(path, ["dpo.bta=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(path, ["dpo.beta"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)


def test_stages_follow_final_stage():
    assert config_from_dict({"final_stage": "ppo"}).stages == ["sft", "reward", "ppo"]
    assert config_from_dict({"final_stage": "dpo"}).stages == ["sft", "dpo"]
    assert config_from_dict({"final_stage": "orpo"}).stages == ["orpo"]
    # reward-model-only: only the sections present run
    assert config_from_dict({"model": {}, "data": {}, "reward": {}}).stages == ["reward"]
    assert config_from_dict({"sft": {}, "reward": {}}).stages == ["sft", "reward"]


def test_deepspeed_roles_inherit_unless_set():
    cfg = config_from_dict({"deepspeed": {"zero_stage": 3, "offload_optimizer": True, "ref": {"zero_stage": 0}}})
    assert cfg.deepspeed.role("actor").zero_stage == 3 and cfg.deepspeed.role("actor").offload_optimizer
    assert cfg.deepspeed.role("ref").zero_stage == 0


def test_resolved_config_round_trips(tmp_path):
    cfg = config_from_dict({"final_stage": "ppo", "ppo": {"kl_coef": 0.2}})
    save_resolved(cfg, tmp_path / "r.yaml")
    again = load_config(tmp_path / "r.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert again.hash() == cfg.hash() != PipelineConfig().hash()


def test_every_error_of_a_file_is_reported_at_once(tmp_path, capsys):
    from rlhf import cli

    path = tmp_path / "many.yaml"
    path.write_text(
        "final_stage: dpp\n"
        "ppo:\n  learning_rate: -1\n  clip_range: 2\n"
        "sft:\n  learnig_rate: 1.0e-5\n  batch_size: eight\n"
        "deepspeed:\n  actor:\n    zero_stage: 4\n"
    )
    p = str(path)
    expected = [
        f"{p}: final_stage: must be one of 'ppo', 'dpo', 'orpo' (got 'dpp')",
        f"{p}: ppo.learning_rate: must be > 0 (got -1.0)",
        f"{p}: ppo.clip_range: must be in (0, 1) (got 2.0)",  # a second range error of the same section
        f"{p}: unknown key 'sft.learnig_rate' (did you mean 'sft.learning_rate'?)",
        f"{p}: sft.batch_size: expected int, got str 'eight'",
        f"{p}: deepspeed.actor.zero_stage: must be 0, 1, 2 or 3 (got 4)",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).splitlines() == expected
    assert cli.main(["preflight", "--config", p]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {line}" for line in expected]


def test_a_cross_field_error_is_reported_once():
    # mini_batch_size 0 fails `> 0`; with it back at its default (4) it would not divide 6 either:
    # that second message would be about a value the file did not set, so it is not reported.
    with pytest.raises(ConfigError) as err:
        config_from_dict({"ppo": {"rollout_batch_size": 6, "mini_batch_size": 0}}, source="c.yaml")
    assert str(err.value) == "c.yaml: ppo.mini_batch_size: must be > 0 (got 0)"


def test_data_sources_take_paths_mappings_and_lists(tmp_path):
    cfg = config_from_dict({"data": {
        "sft": [{"path": "a.jsonl", "weight": 0.5}, "b.jsonl"],
        "preference": {"path": "uf.parquet", "columns": {"chosen": "good"}},
        "prompts": "p.jsonl",
        "columns": {"prompt": "question"},
    }})
    # data.columns is carried by every source; a source's own mapping wins.
    assert [(s.path, s.weight, s.columns) for s in cfg.data.sft] == [
        ("a.jsonl", 0.5, {"prompt": "question"}), ("b.jsonl", 1.0, {"prompt": "question"})]
    assert cfg.data.preference.columns == {"prompt": "question", "chosen": "good"}
    assert cfg.data.prompts.path == "p.jsonl" and cfg.data.sft_eval is None
    save_resolved(cfg, tmp_path / "r.yaml")
    assert load_config(tmp_path / "r.yaml").to_dict() == cfg.to_dict()
    assert config_from_dict({"data": {"sft": "a.jsonl"}}).data.sft == "a.jsonl"  # no mapping: a plain path


@pytest.mark.parametrize("data, message", [
    ({"sft": [{"path": "a.jsonl", "weight": 0}]}, "data.sft[0].weight: must be > 0 (got 0.0)"),
    ({"sft": [{"weight": 2}]}, "data.sft[0].path: is required"),
    ({"sft": {"path": "a.jsonl", "wieght": 2}}, "unknown key 'data.sft.wieght' (did you mean 'data.sft.weight'?)"),
    ({"columns": {"question": "prompt"}}, "data.columns: maps 'question', which no format reads; map onto one of"),
    ({"sft": 3}, "data.sft: expected str, got int 3"),
])
def test_bad_data_sources_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"data": data}, source="my.yaml")
    assert str(err.value).startswith(f"my.yaml: {message}")


@dataclass
class _Inner:
    rate: float = 0.5
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        coerce.require(0 < self.rate < 1, "rate", "must be in (0, 1)")


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    mode: Literal["a", "b"] = "a"
    note: str = field(default="", metadata={"internal": True})


def test_the_coercer_knows_no_schema():
    """`rlhf.coerce` builds any dataclass tree: types converted, overrides merged, every problem named."""
    built = coerce.build(_Outer, {"inner": {"rate": "1e-1"}}, source="x.yaml", overrides=["mode=b", "inner.tags=[t]"])
    assert built == _Outer(inner=_Inner(rate=0.1, tags=["t"]), mode="b")
    assert coerce.dump(built) == {"inner": {"rate": 0.1, "tags": ["t"]}, "mode": "b"}  # no internal field
    with pytest.raises(ConfigError) as err:
        coerce.build(_Outer, {"inner": {"rate": 2, "tgas": []}, "note": "n"}, source="x.yaml", overrides=["mode=c"])
    assert str(err.value).splitlines() == [
        "x.yaml: unknown key 'inner.tgas' (did you mean 'inner.tags'?)",
        "x.yaml: inner.rate: must be in (0, 1) (got 2.0)",
        "x.yaml: unknown key 'note' (did you mean 'mode'?)",  # an internal field is no key
        "--set mode: must be one of 'a', 'b' (got 'c')"]
    with pytest.raises(ConfigError, match=r"^--set mode: expected key=value, e.g. --set section.key=value$"):
        coerce.build(_Outer, {}, source="x.yaml", overrides=["mode"])
