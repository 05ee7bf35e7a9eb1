"""`rlhf preflight`: exit 0 on the shipped tiny config; exit 2 with one clear line per blocker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf import preflight
from rlhf.config import config_from_dict

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def _tiny(tmp_path) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    for key in ("sft", "preference", "prompts"):
        raw["data"][key] = str(ROOT / raw["data"][key])
    return raw


def _write(tmp_path, raw) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_shipped_tiny_config_passes(tmp_path):
    proc = _cli("preflight", "--config", "configs/tiny.yaml", "--set", f"run.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "preflight ok" in proc.stdout and "sft, reward, ppo" in proc.stdout


def test_typo_key_exits_2_with_suggestion(tmp_path):
    raw = _tiny(tmp_path)
    raw["sft"]["learnig_rate"] = 1e-4
    proc = _cli("preflight", "--config", _write(tmp_path, raw))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'sft.learnig_rate' (did you mean 'sft.learning_rate'?)" in lines[0]
    assert "cfg.yaml" in lines[0]


def test_negative_beta_exits_2(tmp_path):
    proc = _cli("preflight", "--config", _write(tmp_path, _tiny(tmp_path)), "--set", "dpo.beta=-0.1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --set dpo.beta: must be > 0 (got -0.1)"]  # blames the override


def test_missing_data_file_exits_2(tmp_path):
    raw = _tiny(tmp_path)
    raw["data"]["preference"] = str(tmp_path / "nope.jsonl")
    proc = _cli("preflight", "--config", _write(tmp_path, raw))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines and all(line.startswith("blocked: [data.invalid]") for line in lines)
    assert "nope.jsonl: no such file" in lines[0]


def test_reward_config_on_a_chosen_only_file_exits_2(tmp_path):
    chosen_only = tmp_path / "chosen_only.jsonl"
    chosen_only.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(3)))
    raw = {"run": {"output_dir": str(tmp_path / "runs")}, "model": {"name_or_path": "tiny-random"},
           "data": {"preference": str(chosen_only)}, "reward": {}}
    proc = _cli("preflight", "--config", _write(tmp_path, raw))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "chosen_only.jsonl" in line and "chosen/rejected" in line


def test_blockers_are_typed_and_cover_stage_inputs_and_models(tmp_path):
    raw = _tiny(tmp_path)
    raw["model"]["name_or_path"] = str(tmp_path / "no_model_here")
    cfg = config_from_dict(raw, source="cfg.yaml")
    blockers = preflight.check(cfg, ["ppo"], standalone=True)
    codes = {b.code for b in blockers}
    assert {"model.unusable", "stage.input_missing"} <= codes
    assert all("\n" not in str(b) for b in blockers)
    # In a pipeline the SFT and reward outputs are produced on the way: not blockers.
    assert "stage.input_missing" not in {b.code for b in preflight.check(cfg, standalone=False)}


def test_unwritable_output_dir_is_a_blocker(tmp_path):
    # A path below a regular file cannot be created, even by root.
    (tmp_path / "a_file").write_text("x")
    raw = _tiny(tmp_path)
    raw["run"]["output_dir"] = str(tmp_path / "a_file" / "runs")
    cfg = config_from_dict(raw, source="cfg.yaml")
    blockers = preflight.check(cfg, ["sft"])
    assert [b.code for b in blockers] == ["output.unwritable"]
    assert "set run.output_dir" in blockers[0].message


def test_data_inspect_cli_flags_verbosity_bias(tmp_path):
    path = tmp_path / "long_wins.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "a long and detailed answer " * 3, "rejected": "short"} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = _cli("data", "inspect", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "verbosity bias" in proc.stdout and "preference" in proc.stdout


def _device_blockers(tmp_path, monkeypatch, *, cuda: bool, bf16: bool = True, **sets):
    import torch

    from rlhf import engine

    monkeypatch.setattr(engine.ranks, "cuda_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    raw = _tiny(tmp_path)
    raw["run"]["device"] = "auto"
    for key, value in sets.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    cfg = config_from_dict(raw, source="cfg.yaml")
    return [b for b in preflight.check_device(cfg, engine.device(cfg.run.device))]


def test_cuda_asked_on_a_machine_without_cuda_is_a_blocker_not_a_cpu_run(tmp_path, monkeypatch):
    blockers = _device_blockers(tmp_path, monkeypatch, cuda=False, run__device="cuda")
    assert [b.code for b in blockers] == ["device.no_cuda"]
    assert "run.device is cuda" in blockers[0].message and "cfg.yaml" in blockers[0].message
    assert _device_blockers(tmp_path, monkeypatch, cuda=False, run__device="auto") == []
    assert _device_blockers(tmp_path, monkeypatch, cuda=True, run__device="cuda") == []


def test_bf16_on_a_gpu_without_it_suggests_fp16(tmp_path, monkeypatch):
    blockers = _device_blockers(tmp_path, monkeypatch, cuda=True, bf16=False, model__dtype="bfloat16")
    assert [b.code for b in blockers] == ["device.no_bf16"]
    assert "Tesla V100" in blockers[0].message and "float16" in blockers[0].message
    assert _device_blockers(tmp_path, monkeypatch, cuda=True, bf16=True, model__dtype="bfloat16") == []
    # on the CPU bf16 weights are not used for training maths on a GPU: nothing to block here
    assert _device_blockers(tmp_path, monkeypatch, cuda=False, bf16=False, model__dtype="bfloat16") == []


def test_fp16_without_deepspeed_has_no_loss_scaling(tmp_path, monkeypatch):
    blockers = _device_blockers(tmp_path, monkeypatch, cuda=True, model__dtype="float16",
                                deepspeed__enabled=False)
    assert [b.code for b in blockers] == ["device.fp16_plain"]
    assert _device_blockers(tmp_path, monkeypatch, cuda=True, model__dtype="float16", deepspeed__enabled=True) == []


def test_a_tracker_that_is_not_installed_is_a_blocker_naming_the_package(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org")
    raw = _tiny(tmp_path)
    raw["logging"]["report_to"] = ["tensorboard", "wandb", "mlflow"]
    cfg = config_from_dict(raw, source="cfg.yaml")
    blockers = preflight.check(cfg, ["sft"])
    assert [(b.code, b.message) for b in blockers] == [
        ("package.missing", "cfg.yaml: logging.report_to has wandb but it is not installed; `pip install wandb` or "
                            "remove it from logging.report_to")]
    raw["logging"]["report_to"] = ["trackio"]
    assert preflight.check(config_from_dict(raw, source="cfg.yaml"), ["sft"]) == []


def test_mlflow_without_a_tracking_uri_needs_the_full_package(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else find_spec(name, *a))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = _tiny(tmp_path)
    raw["logging"]["report_to"] = "mlflow"  # one name is a list of one
    blockers = preflight.check(config_from_dict(raw, source="cfg.yaml"), ["sft"])
    assert [b.code for b in blockers] == ["tracker.mlflow_store"]
    assert "set MLFLOW_TRACKING_URI to your server" in blockers[0].message


def test_an_unknown_tracker_is_a_config_error(tmp_path):
    proc = _cli("preflight", "--config", _write(tmp_path, _tiny(tmp_path)), "--set", "logging.report_to=[wandb,neptune]")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --set logging.report_to: unknown 'neptune'; choose from tensorboard, wandb, mlflow, "
        "trackio (got ['wandb', 'neptune'])"]


class _FakeBuilder:
    """Stands in for a DeepSpeed op builder: `name`, `is_compatible()` and `error_log`, nothing built."""

    def __init__(self, name: str, compatible: bool = True):
        self.name, self._compatible, self.error_log = name, compatible, "needs AVX512" if not compatible else None

    def is_compatible(self, verbose=False):
        return self._compatible


def _op_blockers(tmp_path, monkeypatch, *, cuda: bool, prebuilt: bool = False, cuda_home=None, cxx="c++",
                 compatible: bool = True, **sets):
    import torch
    import torch.utils.cpp_extension as cpp

    from rlhf import engine

    asked: list[tuple[str, bool]] = []
    monkeypatch.setattr(engine.ranks, "cuda_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(preflight, "_op_builder", lambda name, on_gpu: asked.append((name, on_gpu))
                        or _FakeBuilder(name, compatible))
    monkeypatch.setattr(preflight, "_prebuilt", lambda builder: prebuilt)
    monkeypatch.setattr(cpp, "CUDA_HOME", cuda_home)
    monkeypatch.setattr(cpp, "is_ninja_available", lambda: True)
    monkeypatch.setenv("CXX", cxx)
    raw = _tiny(tmp_path)
    raw["run"]["device"] = "auto"
    raw["deepspeed"] = {"enabled": True, **{k: v for k, v in sets.items() if k != "final_stage"}}
    raw["final_stage"] = sets.get("final_stage", "ppo")
    cfg = config_from_dict(raw, source="cfg.yaml")
    return [b for b in preflight.check_optimizer_ops(cfg, cfg.stages, engine.device(cfg.run.device))], asked


def test_a_compiled_optimizer_that_cannot_be_built_is_a_blocker(tmp_path, monkeypatch):
    # deepspeed.torch_adam: false on a GPU without nvcc: the Trainer stages' FusedAdam cannot be built
    blockers, asked = _op_blockers(tmp_path, monkeypatch, cuda=True, torch_adam=False, zero_stage=2)
    assert asked == [("FusedAdamBuilder", True)]  # sft and reward share one check; PPO's AdamW is torch's
    (b,) = blockers
    assert b.code == "deepspeed.op_unavailable" and "\n" not in b.message
    assert "FusedAdam" in b.message and "nvcc" in b.message and "deepspeed.torch_adam: true" in b.message
    assert "DS_BUILD_OPS" in b.message
    # a toolkit with nvcc (and a C++ compiler), or a prebuilt op: nothing to block
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert _op_blockers(tmp_path, monkeypatch, cuda=True, torch_adam=False, cuda_home=str(nvcc.parents[1]))[0] == []
    assert _op_blockers(tmp_path, monkeypatch, cuda=True, torch_adam=False, prebuilt=True)[0] == []


def test_an_offloaded_compiled_optimizer_needs_a_cxx_compiler(tmp_path, monkeypatch):
    # PPO with the actor's optimizer offloaded builds DeepSpeed's CPU Adam (C++), also on a GPU machine
    blockers, asked = _op_blockers(tmp_path, monkeypatch, cuda=True, torch_adam=False, zero_stage=2,
                                   actor={"offload_optimizer": True}, cxx="no-such-compiler")
    assert ("CPUAdamBuilder", True) in asked  # the CUDA accelerator's CPU Adam is the host op
    assert [b.code for b in blockers] == ["deepspeed.op_unavailable"] * 2  # the Trainer stages' FusedAdam too
    assert any("CPUAdam" in b.message and "no-such-compiler" in b.message for b in blockers)
    blockers, _ = _op_blockers(tmp_path, monkeypatch, cuda=False, torch_adam=False, compatible=False)
    assert blockers and "needs AVX512" in blockers[0].message


def test_torch_adamw_needs_no_op_check(tmp_path, monkeypatch):
    # the default (torch's AdamW) builds nothing, on a GPU or not, offloaded or not
    for cuda in (True, False):
        blockers, asked = _op_blockers(tmp_path, monkeypatch, cuda=cuda, zero_stage=2, offload_optimizer=True)
        assert (blockers, asked) == ([], [])


def test_a_torch_older_than_transformers_needs_is_a_blocker(tmp_path, monkeypatch):
    # transformers 5.23 declares torch>=2.6 and below that silently runs without torch (no model loads);
    # a pre-release of 2.6 (NGC images ship 2.6.0a0+...) is older than 2.6 too
    import importlib.metadata

    real = importlib.metadata.version
    cfg = config_from_dict(_tiny(tmp_path), source="cfg.yaml")

    def blockers(torch_version: str) -> list:
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: torch_version if name == "torch" else real(name))
        return preflight.check(cfg, ["sft"])

    (b,) = blockers("2.5.1")
    assert b.code == "package.torch_too_old" and "\n" not in b.message
    assert "torch 2.5.1" in b.message and f"transformers {real('transformers')}" in b.message
    assert "torch>=2.6" in b.message
    assert [b.code for b in blockers("2.6.0a0+ecf3bae40a")] == ["package.torch_too_old"]
    assert blockers("2.6.0") == [] and blockers("2.13.0+cpu") == []


def _port_after_a_store_closed() -> int:
    """A port that a torch TCPStore served and has just closed, its connections left in TIME_WAIT (as
    for about a minute after a run ends)."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = dist.TCPStore("127.0.0.1", port, 2, True, timedelta(seconds=10), wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=10))
    client.set("k", "v")
    assert server.get("k") == b"v"
    del server  # the server side closes first: its end of the connection stays in TIME_WAIT on `port`
    time.sleep(0.1)
    del client
    time.sleep(0.1)
    return port


def test_a_port_in_time_wait_is_free_and_a_live_listener_is_not():
    import socket

    port = _port_after_a_store_closed()
    with socket.socket() as plain:  # the test means something: a bind without SO_REUSEADDR fails here
        with pytest.raises(OSError):
            plain.bind(("0.0.0.0", port))
    assert preflight.check_launch({"NUM_GPUS": "2", "MASTER_PORT": str(port)}) == []
    # a launch that is still running holds a listener there (with SO_REUSEADDR, as TCPStore does)
    with socket.socket() as live:
        live.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        live.bind(("0.0.0.0", port))
        live.listen()
        (b,) = preflight.check_launch({"NUM_GPUS": "2", "MASTER_PORT": str(port)})
        assert b.code == "launch.port_busy" and f"MASTER_PORT={port}" in b.message


def _versions_file(where, node: int, **changes) -> None:
    where.mkdir(parents=True, exist_ok=True)
    info = {**preflight.package_versions(), "host": f"node{node}", **changes}
    (where / f"versions-node{node}.json").write_text(json.dumps(info), encoding="utf-8")


def test_versions_files_of_an_earlier_launch_are_ignored(tmp_path):
    where = tmp_path / "launch"
    # node 1 ran an older torch in an earlier launch and was fixed since; node 0 starts first this time
    _versions_file(where, 1, torch="0.0.1")  # written by a release that recorded no launch
    assert preflight.check_versions(where, 0, 2) == []
    _versions_file(where, 1, torch="0.0.1", launch=None, written=time.time() - 3600)  # an hour old
    assert preflight.check_versions(where, 0, 2, max_age_s=1800) == []
    _versions_file(where, 1, torch="0.0.1", launch="slurm:5001.0.0", written=time.time())  # the job's first run
    env = {"SLURM_JOB_ID": "5001", "SLURM_RESTART_COUNT": "1", "SLURM_STEP_ID": "0"}
    assert preflight.check_versions(where, 0, 2, launch=preflight.launch_id(env)) == []
    # a file of this launch still counts: the same job run, or no job and written within max_age_s
    _versions_file(where, 1, torch="0.0.1", launch="slurm:5001.1.0", written=time.time() - 7200)
    (b,) = preflight.check_versions(where, 0, 2, launch=preflight.launch_id(env))
    assert b.code == "launch.version_mismatch" and "torch" in b.message and "0.0.1" in b.message
    _versions_file(where, 1, torch="0.0.1", launch=None, written=time.time() - 60)
    assert [b.code for b in preflight.check_versions(where, 0, 2)] == ["launch.version_mismatch"]
    # through the launch checks, the environment names the launch: node 0's file of the job's first run
    # is left out when node 1 starts in its second (port 1 refuses: the master host is reachable)
    _versions_file(where, 0, torch="0.0.1", launch="slurm:5001.0.0", written=time.time())
    assert preflight.check_launch({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": "1", **env}, run_dir=tmp_path) == []
