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


# The README's "Using it" to "Trying the result" examples, read statically: every config they name loads with
# its --set overrides, every file they read is in the repository or written by an earlier example, and no
# example re-trains a stage an earlier one trained under other values of its weights' keys (that exits 2).
TRAIN_COMMANDS = ("sft", "reward", "ppo", "dpo", "orpo")
NEEDS_AN_ACCOUNT = ("wandb login",)
"""Examples that need an account or a server, not tried here (their config is the user's own)."""


def _example_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text[text.index("\n## Using it\n"):text.index("\n## GPUs and air-gapped clusters\n")]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", section, flags=re.S | re.M)


def _commands() -> list[list[str]]:
    """Each shell command of the section's bash blocks, in order, as tokens (continuations joined, comments
    and `&&` split off, the account examples left out)."""
    import shlex

    out = []
    for block in _blocks(_example_section(), "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith(NEEDS_AN_ACCOUNT):
                continue
            tokens = shlex.split(line, comments=True)
            while "&&" in tokens:
                cut = tokens.index("&&")
                out.append(tokens[:cut])
                tokens = tokens[cut + 1:]
            if tokens:
                out.append(tokens)
    return out


def _rlhf_args(tokens: list[str]) -> list[str] | None:
    """The arguments after `rlhf` (or the DeepSpeed launcher's `--module rlhf.cli`), None for other commands."""
    for i, token in enumerate(tokens):
        if token == "rlhf" or (token == "rlhf.cli" and tokens[i - 1] == "--module"):
            return tokens[i + 1:]
    return None


def _option(args: list[str], name: str) -> list[str]:
    return [args[i + 1] for i, token in enumerate(args[:-1]) if token == name]


def test_the_examples_read_only_files_that_are_there():
    written: set[str] = set()
    for tokens in _commands():
        read = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "<"]
        args = _rlhf_args(tokens)
        if args is not None:
            read += _option(args, "--config") + _option(args, "--data")
            if args[:2] == ["data", "inspect"] and len(args) > 2 and not args[2].startswith("-"):
                read.append(args[2])
        elif tokens[:2] == ["bash", "stages/pipeline.sh"]:
            read.append(tokens[2])
        for path in read:
            assert (ROOT / path).exists() or path in written, f"README example `{' '.join(tokens)}`: no {path} here"
        written |= {tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == ">"}


def test_the_examples_configs_load_and_no_example_retrains_a_stage_under_other_values():
    from rlhf.config import changed_settings

    trained: dict[Path, object] = {}  # stage dir -> the config of the example that trained it
    for tokens in _commands():
        args = _rlhf_args(tokens)
        configs = _option(args, "--config") if args is not None else []
        if not configs:
            continue
        example = " ".join(tokens)
        cfg = load_config(ROOT / configs[0], _option(args, "--set"))  # unknown keys and bad values raise
        stages = cfg.stages if args[0] == "pipeline" else [args[0]] if args[0] in TRAIN_COMMANDS else []
        for stage in stages:
            before = trained.setdefault(cfg.stage_dir(stage), cfg)
            if "--restart" not in args:
                assert not changed_settings(before, cfg, stage)[0], (
                    f"README example `{example}` re-runs {cfg.stage_dir(stage)}, trained by an earlier example, under "
                    f"other values of {changed_settings(before, cfg, stage)[0]}: it exits 2")


def test_the_config_sections_shown_are_valid():
    """Each YAML block of these sections (the final stage's keys, the logging section), merged into
    configs/tiny.yaml, is a config that loads."""
    import yaml

    from rlhf.config import config_from_dict

    loaded = []
    for block in _blocks(_example_section(), "yaml"):
        raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text(encoding="utf-8"))
        for section, keys in yaml.safe_load(block).items():
            raw[section] = {**raw.get(section, {}), **keys} if isinstance(keys, dict) else keys
        loaded.append(config_from_dict(raw, source="README.md"))
    assert [c.ppo.advantage for c in loaded] == ["grpo", "gae"]
    assert loaded[1].logging.report_to == ["tensorboard", "wandb", "mlflow", "trackio"]
