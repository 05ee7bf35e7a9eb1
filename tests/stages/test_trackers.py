"""`logging.report_to`: the metrics of an SFT and a PPO stage arrive in W&B (offline), MLflow (a file store) and trackio (its local
store) under the same names and steps as metrics.jsonl, with the run name and the resolved config; a resumed
stage continues its tracker runs; a tracker that fails mid-run warns once and the stage still completes."""

from __future__ import annotations

import json
import logging
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, cli_env, tiny_cfg, tiny_raw, write_cfg

from rlhf import artifacts, trackers
from rlhf.config import save_resolved
from rlhf.stages import common, run_stage
from rlhf.tracking import read_metrics

pytestmark = pytest.mark.slow


def tracker_env(tmp_path: Path) -> dict[str, str]:
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
            "MLFLOW_ALLOW_FILE_STORE": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}


def wandb_records(path: Path) -> list:
    """The records of a W&B offline run file: a 7-byte header, then 32 KiB blocks of LevelDB-log records
    (crc32, length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4), each payload a `Record` protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, out, pending, pos = path.read_bytes(), 32768, [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def wandb_run(stage_dir: Path, key: str = "loss") -> tuple[str, dict[str, str], dict[int, float]]:
    """(display name, config, `key` by step) of the stage's offline W&B run (all its resumed parts)."""
    name, config, losses = None, {}, {}
    for path in sorted((stage_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                name = record.run.display_name
                config.update({item.key: item.value_json for item in record.run.config.update})
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                if key in items:
                    losses[items["_step"]] = items[key]
    return name, config, losses


def test_a_stage_logs_to_wandb_mlflow_and_trackio(tmp_path, rlhf_cache, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the store back here
    raw = tiny_raw(tmp_path)
    raw["sft"].update({"max_steps": 4, "save_steps": 2, "logging_steps": 1})
    raw["logging"].update({"report_to": ["tensorboard", "wandb", "mlflow", "trackio"], "project": "proj",
                           "tensorboard": True})
    config = write_cfg(tmp_path, raw)
    env = {**cli_env(rlhf_cache), **tracker_env(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "sft", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stage_dir = tmp_path / "runs" / "tiny" / "sft"
    jsonl = {r["step"]: r["loss"] for r in read_metrics(stage_dir / "metrics.jsonl") if "loss" in r}
    assert sorted(jsonl) == [1, 2, 3, 4]
    assert any((stage_dir / "logs").glob("events.out.tfevents.*"))
    ids = json.loads((stage_dir / trackers.IDS_FILE).read_text())
    assert set(ids) == {"wandb", "mlflow", "trackio"}

    name, wandb_config, wandb_losses = wandb_run(stage_dir)
    assert name == "tiny-sft" and json.loads(wandb_config["sft"])["max_steps"] == 4
    assert wandb_losses == pytest.approx(jsonl)

    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.info.run_name == "tiny-sft" and run.info.status == "FINISHED"
    assert run.data.params["sft.max_steps"] == "4" and run.data.tags["rlhf.run"] == "tiny"
    assert client.get_experiment(run.info.experiment_id).name == "proj"
    mlflow_losses = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], "loss")}
    assert mlflow_losses == pytest.approx(jsonl)

    with sqlite3.connect(tmp_path / "trackio" / "proj.db") as db:
        rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = 'tiny-sft'").fetchall()
        (trackio_config,) = db.execute("SELECT config FROM configs WHERE run_name = 'tiny-sft'").fetchone()
    trackio_losses = {step: json.loads(metrics)["loss"] for step, metrics in rows if "loss" in json.loads(metrics)}
    assert trackio_losses == pytest.approx(jsonl)
    assert json.loads(trackio_config)["sft"]["max_steps"] == 4 and json.loads(trackio_config)["_Group"] == "tiny"


def test_a_resumed_stage_continues_its_mlflow_run(tmp_path, rlhf_cache, monkeypatch):
    for key, value in tracker_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    from mlflow.tracking import MlflowClient
    from transformers import TrainerCallback

    class StopAfterStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = control.should_training_stop or state.global_step == 2

    cfg = tiny_cfg(tmp_path, ["sft.max_steps=4", "sft.save_steps=2", "sft.logging_steps=1",
                              "logging.report_to=[mlflow]"])
    with pytest.MonkeyPatch.context() as mp:  # ends at step 2 of 4, after checkpoint-2
        own = common.StageRun.callbacks
        mp.setattr(common.StageRun, "callbacks", lambda self: own(self) + [StopAfterStep2()])
        run_stage("sft", cfg)
    first = json.loads((cfg.stage_dir("sft") / trackers.IDS_FILE).read_text())["mlflow"]
    (cfg.stage_dir("sft") / artifacts.MANIFEST).unlink()  # as if it had stopped right after checkpoint-2
    run_stage("sft", cfg)
    assert json.loads((cfg.stage_dir("sft") / trackers.IDS_FILE).read_text())["mlflow"] == first
    client = MlflowClient()
    assert sorted(m.step for m in client.get_metric_history(first, "loss")) == [1, 2, 3, 4]
    assert client.get_run(first).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("rlhf").experiment_id])) == 1


def test_a_tracker_that_fails_mid_run_warns_once_and_the_stage_completes(tmp_path, rlhf_cache, monkeypatch,
                                                                           caplog):
    for key, value in tracker_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    calls = []
    log = trackers._Mlflow.log

    def network_gone(self, step, scalars):
        calls.append(step)
        if len(calls) >= 2:
            raise ConnectionError("mlflow.example.org: Connection refused")
        log(self, step, scalars)

    monkeypatch.setattr(trackers._Mlflow, "log", network_gone)
    caplog.set_level(logging.WARNING, logger="rlhf")
    cfg = tiny_cfg(tmp_path, ["sft.max_steps=4", "sft.logging_steps=1", "logging.report_to=[mlflow]"])
    result = run_stage("sft", cfg)
    assert artifacts.is_complete(cfg.stage_dir("sft")) and result.final_dir.is_dir()
    warnings = [r.getMessage() for r in caplog.records if "report_to" in r.getMessage()]
    assert warnings == ["logging.report_to: mlflow failed (ConnectionError: mlflow.example.org: Connection refused); "
                        "it gets no more metrics from this run, which goes on"]
    assert calls == [1, 2]  # not called again after the failure
    steps = [r["step"] for r in read_metrics(cfg.stage_dir("sft") / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # metrics.jsonl and the other sinks are unaffected


def test_the_ppo_loop_logs_its_stats_to_every_tracker(tmp_path, monkeypatch, rlhf_cache, tiny_model_dir,
                                                     tiny_reward_dir):
    from test_ppo import make_cfg

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    cfg = make_cfg(tmp_path, tiny_model_dir, tiny_reward_dir)
    cfg.logging.report_to = ["wandb", "mlflow", "trackio"]
    save_resolved(cfg, tmp_path / "ppo.yaml")
    done = subprocess.run([sys.executable, "-m", "rlhf.cli", "ppo", "--config", str(tmp_path / "ppo.yaml")],
                          cwd=ROOT, env={**cli_env(rlhf_cache), **tracker_env(tmp_path)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    stage_dir = cfg.stage_dir("ppo")
    jsonl = read_metrics(stage_dir / "metrics.jsonl")
    ids = json.loads((stage_dir / trackers.IDS_FILE).read_text())
    key = "objective/kl"
    expected = {r["step"]: r[key] for r in jsonl if key in r}
    assert sorted(expected) == [1, 2]

    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    assert client.get_run(ids["mlflow"]).info.run_name == "t-ppo"
    for name in ("objective/kl", "policy/loss", "value/loss", "objective/score_mean"):
        history = {m.step: m.value for m in client.get_metric_history(ids["mlflow"], name)}
        assert history == pytest.approx({r["step"]: r[name] for r in jsonl if name in r}), name
    name, _, history = wandb_run(stage_dir, key)
    assert name == "t-ppo" and history == pytest.approx(expected)
    with sqlite3.connect(tmp_path / "trackio" / "rlhf.db") as db:
        rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = 't-ppo'").fetchall()
    assert {step: json.loads(m)[key] for step, m in rows if key in json.loads(m)} == pytest.approx(expected)
