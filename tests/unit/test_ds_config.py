"""The DeepSpeed configs the package builds: throughput timer off (it synchronizes the device inside
forward, which a CUDA-graph capture cannot survive), ZeRO bucket sizes from the model's hidden size
(DeepSpeed's defaults allocate a 5e8-element gradient bucket per trained engine), and torch's AdamW as
the optimizer unless `deepspeed.torch_adam: false`. No DeepSpeed engine is built here."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf import engine
from rlhf.config import DeepSpeedCfg, ZeroRoleCfg, config_from_dict
from rlhf.errors import ModelError

CPU = torch.device("cpu")

ROOT = Path(__file__).resolve().parents[2]
TIMER_OFF = {"throughput": {"enabled": False}}


def _cfg(tmp_path, **deepspeed):
    return config_from_dict({"run": {"output_dir": str(tmp_path)}, "model": {"name_or_path": "tiny-random"},
                             "data": {"sft": "x.jsonl"}, "sft": {}, "deepspeed": deepspeed}, source="cfg.yaml")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_every_built_config_has_the_timer_off_and_buckets_from_the_hidden_size(stage, train):
    # hidden 64: reduce and all-gather buckets 64^2 = 4096, prefetch int(0.9 * 4096) = 3686,
    # persistence threshold 10 * 64 = 640 (transformers' "auto" rule)
    conf = engine.ds_config(DeepSpeedCfg(), ZeroRoleCfg(zero_stage=stage), train=train, micro_batch=1,
                            grad_accum=1, hidden_size=64)
    assert conf["timers"] == TIMER_OFF
    zero = conf["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096
    if stage == 3:
        assert (zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (3686, 640)
        assert "allgather_bucket_size" not in zero
    else:
        assert "stage3_prefetch_bucket_size" not in zero and "stage3_param_persistence_threshold" not in zero
    assert zero.get("allgather_bucket_size") == (4096 if stage in (1, 2) else None)


def test_bucket_sizes_stay_even_for_deepspeed_s_alignment():
    # ZeRO-1/2 assert that the all-gather bucket is a multiple of 2 elements: hidden 9 gives 81 -> 82
    assert engine.bucket_sizes(9, 2) == {"reduce_bucket_size": 81, "allgather_bucket_size": 82}
    assert engine.bucket_sizes(10, 3) == {"reduce_bucket_size": 100, "stage3_prefetch_bucket_size": 90,
                                          "stage3_param_persistence_threshold": 100}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_trainer_stage_configs_leave_buckets_to_the_trainer_and_turn_the_timer_off(tmp_path, stage):
    # "auto": the HF Trainer fills the three keys from model.config.hidden_size as it starts
    conf = engine.trainer_ds_config(_cfg(tmp_path, zero_stage=stage), CPU)
    assert conf["timers"] == TIMER_OFF
    zero = conf["zero_optimization"]
    assert zero["reduce_bucket_size"] == "auto"
    stage3 = {k: zero.get(k) for k in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")}
    assert stage3 == ({k: "auto" for k in stage3} if stage == 3 else {k: None for k in stage3})


def test_the_trainer_fills_the_auto_buckets_from_the_model(tmp_path):
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    conf = HfTrainerDeepSpeedConfig(engine.trainer_ds_config(_cfg(tmp_path, zero_stage=3), CPU))
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=64))
    args = SimpleNamespace(get_warmup_steps=lambda steps: 0)
    conf.trainer_config_finalize(args, model, 10)
    zero = conf.config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "deepspeed").glob("*.json")))
def test_shipped_and_user_json_files_get_the_timer_off_unless_they_set_it(tmp_path, name):
    shipped = engine.trainer_ds_config(_cfg(tmp_path, config_file=str(ROOT / "configs" / "deepspeed" / name)), CPU)
    assert shipped["timers"] == TIMER_OFF
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert engine.trainer_ds_config(_cfg(tmp_path, config_file=str(user)), CPU)["timers"] == TIMER_OFF
    own = {"throughput": {"enabled": True, "synchronized": False}}
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}, "timers": own}))
    assert engine.trainer_ds_config(_cfg(tmp_path, config_file=str(user)), CPU)["timers"] == own


def test_hidden_size_follows_transformers_auto_rule():
    assert engine.hidden_size_of(SimpleNamespace(hidden_size=64)) == 64
    assert engine.hidden_size_of(SimpleNamespace(hidden_sizes=[32, 96, 64])) == 96  # the largest
    assert engine.hidden_size_of(SimpleNamespace(text_config=SimpleNamespace(hidden_size=48))) == 48
    assert engine.hidden_size_of(SimpleNamespace(text_config=SimpleNamespace(hidden_sizes=[8, 16]))) == 16
    with pytest.raises(ModelError, match="neither hidden_size nor hidden_sizes"):
        engine.hidden_size_of(SimpleNamespace(vocab_size=10))
    with pytest.raises(ModelError, match="Linear: no module of the model has a config"):
        engine.model_hidden_size(torch.nn.Linear(2, 2))


class _Head(torch.nn.Module):
    """A module without a config around one that has one (as PPO's ScalarHead wraps a classifier)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.model = torch.nn.Linear(2, 2)
        self.model.config = SimpleNamespace(hidden_size=hidden)


@pytest.fixture
def built(monkeypatch):
    """The configs `wrap` hands to DeepSpeed, captured instead of building engines."""
    confs: list[dict] = []
    monkeypatch.setattr(engine.training, "initialize", lambda model, conf, **kw: confs.append(conf) or conf)
    return confs


@pytest.mark.parametrize("stage", [2, 3])
def test_wrap_sizes_the_buckets_from_the_wrapped_model(built, stage):
    ds = DeepSpeedCfg(enabled=True, zero_stage=stage)
    engine.wrap(_Head(32), ds, "critic", adamw=engine.AdamW(lr=1e-3))
    engine.wrap(_Head(32), ds, "ref")
    for conf in built:
        assert conf["timers"] == TIMER_OFF and conf["zero_optimization"]["reduce_bucket_size"] == 32 * 32
    assert built[1]["zero_optimization"]["stage"] == (3 if stage == 3 else 0)  # inference: nothing to shard


def test_torch_adamw_is_the_default_on_cuda_and_fused_where_its_states_are_on_the_gpu(tmp_path, monkeypatch,
                                                                                      built):
    monkeypatch.setattr(engine.ranks, "cuda_available", lambda: True)

    def params(conf: dict) -> dict:
        return conf["optimizer"]["params"]

    assert params(engine.trainer_ds_config(_cfg(tmp_path), CPU))["torch_adam"] is True
    shipped = engine.trainer_ds_config(_cfg(tmp_path, config_file=str(ROOT / "configs/deepspeed/zero3.json")), CPU)
    assert params(shipped)["torch_adam"] is True and params(shipped)["fused"] is True
    engine.wrap(_Head(8), DeepSpeedCfg(enabled=True, zero_stage=2, offload_optimizer=True), "actor",
                adamw=engine.AdamW(lr=1e-3))
    assert params(built[-1])["torch_adam"] is True
    on_gpu = engine.ds_config(DeepSpeedCfg(), ZeroRoleCfg(zero_stage=2), train=True, micro_batch=1, grad_accum=1,
                              hidden_size=64)
    assert params(on_gpu)["torch_adam"] is True and params(on_gpu)["fused"] is True
    offloaded = engine.ds_config(DeepSpeedCfg(), ZeroRoleCfg(zero_stage=2, offload_optimizer=True), train=True,
                                 micro_batch=1, grad_accum=1, hidden_size=64)
    assert params(offloaded)["torch_adam"] is True and "fused" not in params(offloaded)  # states on the CPU
    # opting into DeepSpeed's compiled optimizers
    compiled = engine.ds_config(DeepSpeedCfg(torch_adam=False), ZeroRoleCfg(zero_stage=2), train=True,
                                micro_batch=1, grad_accum=1, hidden_size=64)
    assert params(compiled)["torch_adam"] is False and "fused" not in params(compiled)
    shipped = engine.trainer_ds_config(_cfg(tmp_path, torch_adam=False,
                                            config_file=str(ROOT / "configs/deepspeed/zero3.json")), CPU)
    assert "torch_adam" not in params(shipped) and "fused" not in params(shipped)


def test_compiled_optimizer_ops_name_the_setting_that_asks_for_them(tmp_path, monkeypatch):
    monkeypatch.setattr(engine.ranks, "cuda_available", lambda: True)
    assert engine.compiled_optimizer_ops(_cfg(tmp_path), ["sft", "ppo"]) == {}
    assert engine.compiled_optimizer_ops(_cfg(tmp_path, torch_adam=False), ["sft"]) == {
        "FusedAdamBuilder": "deepspeed.torch_adam: false"}
    # PPO's own AdamW is torch's; only an offloaded role has DeepSpeed build one from the config
    assert engine.compiled_optimizer_ops(_cfg(tmp_path, torch_adam=False), ["ppo"]) == {}
    offloaded = _cfg(tmp_path, torch_adam=False, critic={"offload_optimizer": True})
    assert engine.compiled_optimizer_ops(offloaded, ["ppo"]) == {
        "CPUAdamBuilder": "deepspeed.torch_adam: false with the critic's optimizer offloaded"}
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"torch_adam": False}},
                                "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    assert engine.compiled_optimizer_ops(_cfg(tmp_path, config_file=str(user)), ["sft"]) == {
        "CPUAdamBuilder": f"{user}: optimizer.params.torch_adam false"}
