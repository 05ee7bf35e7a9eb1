"""SIGKILL inside an SFT step with W&B (offline), MLflow (a file store) and trackio (its local database), then
the same command again: every store, read back with its own reader, holds every step of metrics.jsonl once.

W&B offline writes its file every 15 s, so the killed process's file holds no history at all; the resumed
run sends W&B the steps its earlier files lack before training goes on (`tracking.MetricsLogger`)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys

import pytest
from faultkit import run_cli, tiny_raw, write_cfg

from rlhf import trackers
from rlhf.tracking import read_metrics

pytestmark = pytest.mark.slow


def wandb_history(stage_dir, key: str) -> dict[int, list[float]]:
    """`key` by step over every offline file of the stage's W&B run, read by wandb's own reader."""
    out: dict[int, list[float]] = {}
    for part in sorted((stage_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(part)],
                              capture_output=True, text=True, timeout=120)
        for line in done.stdout.splitlines():
            record = json.loads(line)
            if record["type"] == "history" and key in record["history"]["item"]:
                out.setdefault(record["history"]["step"]["num"], []).append(record["history"]["item"][key])
    return out


def test_every_tracker_holds_every_step_after_a_sigkill_and_resume(tmp_path, rlhf_cache, monkeypatch):
    store = tmp_path / "mlruns"
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": store.as_uri(),
                       "MLFLOW_ALLOW_FILE_STORE": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}.items():
        monkeypatch.setenv(key, value)  # run_cli passes this process's environment on
    raw = tiny_raw(tmp_path, final_stage=None)
    raw["sft"].update({"max_steps": 4, "save_steps": 2})
    raw["logging"].update({"report_to": ["wandb", "mlflow", "trackio"], "project": "p"})
    config = str(write_cfg(tmp_path / "cfg.yaml", raw))
    killed = run_cli(["sft", "--config", config], rlhf_cache, fault="kill_in_step:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = run_cli(["sft", "--config", config], rlhf_cache)
    assert done.returncode == 0, done.stderr[-3000:]

    stage_dir = tmp_path / "runs" / "tiny" / "sft"
    jsonl = {r["step"]: r["loss"] for r in read_metrics(stage_dir / "metrics.jsonl") if "loss" in r}
    assert sorted(jsonl) == [1, 2, 3, 4]
    ids = json.loads((stage_dir / trackers.IDS_FILE).read_text())

    assert wandb_history(stage_dir, "loss") == {step: [pytest.approx(loss)] for step, loss in jsonl.items()}

    from mlflow.tracking import MlflowClient

    history = MlflowClient(store.as_uri()).get_metric_history(ids["mlflow"], "loss")
    assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(v)) for s, v in sorted(jsonl.items())]

    with sqlite3.connect(tmp_path / "trackio" / "p.db") as db:
        rows = db.execute("SELECT step, metrics FROM metrics WHERE run_name = 'tiny-sft'").fetchall()
    assert sorted((s, json.loads(m)["loss"]) for s, m in rows if "loss" in json.loads(m)) == [
        (s, pytest.approx(v)) for s, v in sorted(jsonl.items())]
