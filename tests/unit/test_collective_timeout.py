"""`run.collective_timeout_s`: the one timeout of the process group, set where the group is made."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from rlhf import engine
from rlhf.config import config_from_dict
from rlhf.errors import ConfigError


def test_the_setting_defaults_to_30_minutes_and_must_be_positive():
    assert config_from_dict({}, source="t.yaml").run.collective_timeout_s == 1800.0
    assert config_from_dict({"run": {"collective_timeout_s": 7200}}, source="t.yaml").run.collective_timeout_s == 7200
    with pytest.raises(ConfigError) as err:
        config_from_dict({"run": {"collective_timeout_s": 0}}, source="t.yaml")
    assert "\n" not in str(err.value) and "t.yaml" in str(err.value) and "run.collective_timeout_s" in str(err.value)


def _group_timeout(monkeypatch, timeout_s: float | None) -> timedelta:
    """The timeout of the gloo group `engine.init_distributed(timeout_s)` makes for one launched rank."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(engine.COLLECTIVES_ALWAYS, raising=False)  # no store for a failure watcher at one rank
    monkeypatch.setattr(engine.ranks, "cuda_available", lambda: False)
    assert not dist.is_initialized()
    try:
        engine.init_distributed() if timeout_s is None else engine.init_distributed(timeout_s)
        return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout
    finally:
        engine.cleanup()


@pytest.mark.timeout(60)
def test_init_distributed_gives_the_group_the_configured_timeout(monkeypatch):
    assert _group_timeout(monkeypatch, 90) == timedelta(seconds=90)
    assert _group_timeout(monkeypatch, None) == timedelta(minutes=30)  # the setting's default, whatever torch's is


def test_every_stage_makes_its_process_group_with_the_configured_timeout(monkeypatch):
    # rlhf.stages.run_stage is where every training command's process group is made
    from rlhf import preflight, stages

    seen = []
    monkeypatch.setattr(preflight, "check", lambda *args, **kwargs: [])
    monkeypatch.setattr(stages, "_materialize_aliases", lambda cfg: None)
    monkeypatch.setattr(engine, "init_distributed", lambda timeout_s=None: seen.append(timeout_s))

    class Stage:
        @staticmethod
        def run(cfg, restart=False):
            return "done"

    monkeypatch.setattr(stages, "_module", lambda name: Stage)
    cfg = config_from_dict({"run": {"collective_timeout_s": 600}}, source="t.yaml")
    assert stages.run_stage("sft", cfg) == "done"
    assert seen == [600]
