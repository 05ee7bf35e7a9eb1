"""SFT stage on the tiny fixture: loss drops, artifacts follow the contract, the model reloads and
generates, LoRA saves a merged model, and a SIGKILLed run resumes from its last checkpoint."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, cli_env, tiny_cfg, tiny_raw, write_cfg
from safetensors.torch import load_file

from rlhf import artifacts, models
from rlhf.stages import run_stage
from rlhf.tracking import read_metrics

pytestmark = pytest.mark.slow

FAULTY_CLI = ROOT / "tests" / "faults" / "faulty_cli.py"


def test_sft_loss_drops_and_model_reloads(tmp_path, rlhf_cache):
    cfg = tiny_cfg(tmp_path, ["sft.max_steps=24", "sft.logging_steps=2", "sft.save_steps=12"])
    result = run_stage("sft", cfg)
    stage_dir = cfg.stage_dir("sft")
    losses = [r["loss"] for r in read_metrics(stage_dir / "metrics.jsonl") if "loss" in r]
    # Stated margin: the last logged training loss is at least 15% below the first.
    assert losses[-1] < 0.85 * losses[0], losses
    manifest = artifacts.read_manifest(stage_dir)
    assert manifest["stage"] == "sft" and manifest["global_step"] == 24
    assert manifest["metrics"]["eval_perplexity"] > 1.0
    final = result.final_dir
    assert (final / "config.resolved.yaml").is_file() and (final / "model.safetensors").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))
    assert (stage_dir / "curves.png").is_file() and list((stage_dir / "logs").iterdir())
    # Every trainable tensor changed.
    base = load_file(str(models.resolve_model("tiny-random")) + "/model.safetensors")
    tuned = load_file(str(final / "model.safetensors"))
    assert all(not torch.equal(base[k], tuned[k]) for k in base)
    # Reloads in plain transformers and generates.
    tok = models.load_tokenizer(str(final))
    model = models.load_causal_lm(str(final), tokenizer=tok).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_sft_lora_saves_a_merged_plain_model(tmp_path, rlhf_cache):
    cfg = tiny_cfg(tmp_path, ["sft.max_steps=3", "model.lora.enabled=true", "model.lora.r=4"])
    final = run_stage("sft", cfg).final_dir
    assert not (final / "adapter_config.json").exists()
    assert models.model_kind(str(final)) == "causal_lm"
    models.load_causal_lm(str(final))


def test_sft_sigkill_then_resume_continues_step_count(tmp_path, rlhf_cache):
    raw = tiny_raw(tmp_path)
    raw["sft"].update({"max_steps": 40, "save_steps": 5, "logging_steps": 1})
    config = write_cfg(tmp_path, raw)
    gate = tmp_path / "gate"  # never created: the run is held at the start of step 12 until it is killed
    env = {**cli_env(rlhf_cache), "RLHF_FAULT": "wait_in_step:12", "RLHF_FAULT_GATE": str(gate)}
    ckpts = tmp_path / "runs" / "tiny" / "sft" / "checkpoints"
    proc = subprocess.Popen([sys.executable, str(FAULTY_CLI), "sft", "--config", str(config)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not gate.with_name("gate.waiting").exists():
        assert proc.poll() is None and time.time() < deadline, "the run never reached step 12"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # from outside, as when a node dies
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = artifacts.latest_checkpoint(ckpts)
    assert done is not None and artifacts.checkpoint_step(done) >= 10
    assert not (tmp_path / "runs" / "tiny" / "sft" / artifacts.MANIFEST).exists()
    again = subprocess.run([sys.executable, "-m", "rlhf.cli", "sft", "--config", str(config)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming from {done}" in again.stderr
    manifest = json.loads((tmp_path / "runs" / "tiny" / "sft" / artifacts.MANIFEST).read_text())
    assert manifest["global_step"] == 40
    steps = [r["step"] for r in read_metrics(tmp_path / "runs" / "tiny" / "sft" / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # no duplicates from the killed run


def test_sft_trains_on_sharegpt_conversations(tmp_path, rlhf_cache):
    """data/tiny/sft.jsonl rewritten as two-turn ShareGPT rows (from/value, a system prompt): every
    assistant turn is in the loss, and the stage runs and saves from them."""
    rows = [json.loads(line) for line in (ROOT / "data" / "tiny" / "sft.jsonl").read_text().splitlines()[:40]]
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text("".join(json.dumps({"system": "Be kind.", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": row["prompt"]}, {"from": "gpt", "value": row["completion"]}]}) + "\n"
        for row in rows))
    cfg = tiny_cfg(tmp_path, ["sft.max_steps=3", f"data.sft={sharegpt}", "logging.tensorboard=false",
                              "logging.plots=false"])
    result = run_stage("sft", cfg)
    manifest = artifacts.read_manifest(cfg.stage_dir("sft"))
    assert manifest["global_step"] == 3 and manifest["inputs"]["data"] == str(sharegpt)
    assert math.isfinite(manifest["metrics"]["eval_loss"]) and (result.final_dir / "model.safetensors").is_file()
