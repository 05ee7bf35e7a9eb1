"""From the CLI: `rlhf data synth --method constitutional` on the tiny model, then `rlhf dpo` on its pairs.

The SFT input is faked as in test_dpo.py (the tiny model copied into <run>/sft/final). The random tiny
model almost never emits EOS, so every reply would be cut off and dropped; a bias on the EOS logit
(`GenerationConfig.sequence_bias`) makes its replies end within a few tokens.
"""

from __future__ import annotations

import json
import shutil

import yaml

from rlhf import artifacts
from rlhf.cli import main
from rlhf.commands import synth


def test_dpo_trains_on_constitutional_pairs(tmp_path, tiny_model_dir, monkeypatch):
    plain = synth.generation_config

    def eos_biased(tokenizer, s, max_new_tokens=None):
        config = plain(tokenizer, s, max_new_tokens)
        config.sequence_bias = {(tokenizer.eos_token_id,): 6.0}
        return config

    monkeypatch.setattr(synth, "generation_config", eos_biased)
    out, principles = tmp_path / "pairs", tmp_path / "principles.yaml"
    principles.write_text("principles:\n  - {name: kind, critique: 'Is it unkind?', revision: Make it kind.}\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "run": {"name": "cai", "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"preference": str(out / "preference.jsonl"), "eval_fraction": 0.25, "max_length": 96,
                 "max_prompt_length": 48},
        "final_stage": "dpo", "ppo": {"temperature": 1.0},
        "dpo": {"max_steps": 2, "batch_size": 2, "save_steps": 2, "logging_steps": 1},
        "logging": {"progress": False, "tensorboard": False, "plots": False}}))
    assert main(["data", "synth", "--config", str(cfg), "--out", str(out), "--method", "constitutional",
                 "--principles", str(principles), "--k", "2", "--n-prompts", "6", "--n-eval-prompts", "0",
                 "--max-new-tokens", "10", "--critique-tokens", "6"]) == 0
    pairs = [json.loads(line) for line in (out / "preference.jsonl").read_text().splitlines()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(pairs) == manifest["counts"]["pairs"] >= 3
    assert all(p["chosen"] and p["chosen"] != p["rejected"] and p["principle"] == "kind" for p in pairs)
    assert manifest["command"].startswith(f"rlhf data synth --config {cfg} --out {out} --k 2 --method constitutional")

    sft = tmp_path / "runs" / "cai" / "sft"
    shutil.copytree(tiny_model_dir, sft / "final")
    artifacts.write_manifest(sft, "sft", inputs={}, config_hash="test", metrics={})
    assert main(["dpo", "--config", str(cfg)]) == 0
    dpo = artifacts.read_manifest(tmp_path / "runs" / "cai" / "dpo")
    assert dpo["global_step"] == 2 and (tmp_path / "runs" / "cai" / "dpo" / "final" / "model.safetensors").is_file()
