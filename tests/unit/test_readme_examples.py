"""The README's `rlhf export --adapter-only` example points at a stage that a shipped config trains with LoRA
(export refuses --adapter-only for full weights)."""

from __future__ import annotations

import re
from pathlib import Path

from rlhf.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_adapter_only_example_names_a_lora_stage_of_a_shipped_config():
    lines = [line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
             if line.startswith("rlhf export") and "--adapter-only" in line]
    assert lines, "README.md: no `rlhf export ... --adapter-only` example"
    for line in lines:
        found = re.search(r"--checkpoint runs/([\w.-]+)/(\w+)/checkpoints/checkpoint-(\d+)", line)
        assert found, line
        name, stage, step = found.group(1), found.group(2), int(found.group(3))
        configs = [cfg for cfg in map(load_config, sorted((ROOT / "configs").glob("*.yaml"))) if cfg.run.name == name]
        assert configs, f"{line}: no configs/*.yaml has run.name {name}"
        cfg = configs[0]
        assert stage in cfg.stages and cfg.model.lora.enabled, f"{line}: {cfg.source} trains {stage} without LoRA"
        section = getattr(cfg, stage)
        saves = getattr(section, "save_steps", None)
        assert saves and step % saves == 0, f"{line}: {cfg.source} saves {stage} every {saves} steps"
