"""SFT under `deepspeed --num_gpus 2` on CPU with a shipped DeepSpeed JSON (ZeRO-2, optimizer offloaded):
trains, saves a plain HF model, and the saved model generates. The main rank claims the stage dir for both
ranks: a dead run's claim is taken over once. Only the main rank reports to the tracker (one MLflow run)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from rlhf import artifacts, claims, models

sys.path.insert(0, str(Path(__file__).parent))
from launch import deepspeed_cli  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("ds_file", ["zero2_offload.json"])
def test_sft_with_shipped_deepspeed_config(tmp_path, rlhf_cache, ds_file, monkeypatch):
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["run"]["output_dir"] = str(tmp_path / "runs")
    raw["data"]["sft"] = str(ROOT / raw["data"]["sft"])
    raw["sft"].update({"max_steps": 4, "save_steps": 2, "logging_steps": 1})
    raw["deepspeed"] = {"enabled": True, "config_file": str(ROOT / "configs" / "deepspeed" / ds_file)}
    raw["logging"]["report_to"] = ["mlflow"]
    store = {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(raw))
    stage_dir = tmp_path / "runs" / "tiny" / "sft"
    # A claim left by a run on another machine whose heartbeat stopped long ago: one rank takes it over for both.
    stage_dir.mkdir(parents=True)
    (stage_dir / claims.CLAIM).write_text(json.dumps({"token": "gone", "host": "node-b", "pid": 4242,
                                                      "machine": "node-b", "started": 0}), encoding="utf-8")
    os.utime(stage_dir / claims.CLAIM, (0, 0))
    proc = deepspeed_cli(["sft", "--config", str(config)], timeout=400, env=store)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    for key, value in store.items():
        monkeypatch.setenv(key, value)
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("rlhf").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
    assert (proc.stdout + proc.stderr).count("taking over the claim of pid 4242 on node-b") == 1
    assert not (stage_dir / claims.CLAIM).exists()
    assert artifacts.read_manifest(stage_dir)["global_step"] == 4
    ckpt = artifacts.latest_checkpoint(stage_dir / "checkpoints")
    assert ckpt is not None and (ckpt / "global_step4").is_dir()  # a DeepSpeed checkpoint, complete
    tok = models.load_tokenizer(str(stage_dir / "final"))
    model = models.load_causal_lm(str(stage_dir / "final"), tokenizer=tok)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
