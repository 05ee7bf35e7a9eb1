"""The artifact contract between stages.

Each stage writes `<run>/<stage>/`:
  checkpoints/checkpoint-<step>/   while training (a checkpoint counts only once it is complete)
  final/                           HF model dir: safetensors, tokenizer, config.resolved.yaml
  metrics.jsonl, logs/, *.png      metrics, TensorBoard events, plots
  stage.json                       written atomically, last: the stage is complete only when it exists
  claim.json                       while a run lives there: who holds the dir (`rlhf.claims`); never proof
                                   of anything finished

Later stages find their inputs through `stage.json` and refuse a wrong kind of model with a clear error.
Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from rlhf.errors import ArtifactError

MANIFEST = "stage.json"
RESOLVED_CONFIG = "config.resolved.yaml"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "checkpoint.complete"

# What each stage's final/ holds, checked by the stages that consume it.
STAGE_MODEL_KIND = {"sft": "causal_lm", "reward": "reward_model", "ppo": "causal_lm", "dpo": "causal_lm",
                     "orpo": "causal_lm"}
STAGE_COMMAND = {"sft": "rlhf sft", "reward": "rlhf reward", "ppo": "rlhf ppo", "dpo": "rlhf dpo",
                 "orpo": "rlhf orpo"}


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON to a temp file in the same dir, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(stage_dir: str | Path) -> dict | None:
    """The stage's manifest, or None when the stage has not finished."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ArtifactError(f"{path}: unreadable stage manifest; delete it and re-run the stage") from None


def is_complete(stage_dir: str | Path) -> bool:
    return read_manifest(stage_dir) is not None


def holds_training(stage_dir: str | Path) -> bool:
    """Whether `stage_dir` holds weights a run would resume from or keep: stage.json, a complete checkpoint
    or final/."""
    stage_dir = Path(stage_dir)
    return ((stage_dir / MANIFEST).is_file() or (stage_dir / "final").is_dir()
            or latest_checkpoint(stage_dir / "checkpoints") is not None)


def trained_step(stage_dir: str | Path) -> int | None:
    """The optimizer step of the newest weights in `stage_dir`: the larger of stage.json's global_step and
    the newest complete checkpoint's; None when it has neither."""
    stage_dir = Path(stage_dir)
    latest = latest_checkpoint(stage_dir / "checkpoints")
    steps = [(read_manifest(stage_dir) or {}).get("global_step"), checkpoint_step(latest) if latest else None]
    return max((s for s in steps if isinstance(s, int)), default=None)


def recorded_config(stage_dir: str | Path) -> Path | None:
    """The file that records the settings the weights in `stage_dir` were trained with: the stage dir's
    config.resolved.yaml (written when a run starts, so it describes the checkpoints), else final/'s; None
    when neither exists."""
    stage_dir = Path(stage_dir)
    for path in (stage_dir / RESOLVED_CONFIG, stage_dir / "final" / RESOLVED_CONFIG):
        if path.is_file():
            return path
    return None


def write_manifest(stage_dir: str | Path, stage: str, *, inputs: dict[str, str], config_hash: str,
                   metrics: dict[str, Any], global_step: int | None = None,
                   devices: dict[str, str] | None = None) -> Path:
    """Mark a stage complete. Call last, after `final/` is fully written. `devices`: where each of the
    stage's models ran (role -> "cuda:0", "cpu"), as recorded by the stage."""
    stage_dir = Path(stage_dir)
    manifest = {
        "stage": stage,
        "model_kind": STAGE_MODEL_KIND[stage],
        "final": "final",
        "inputs": inputs,
        "config_hash": config_hash,
        "metrics": metrics,
        "global_step": global_step,
        "devices": devices or {},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_json_atomic(stage_dir / MANIFEST, manifest)


def stage_output(stage_dir: str | Path, stage: str, *, needed_by: str, config_path: str = "FILE") -> Path:
    """The `final/` dir of a completed earlier stage, or a one-line error saying what to run."""
    stage_dir = Path(stage_dir)
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise ArtifactError(
            f"{stage_dir}: the {stage} stage has not finished (no {MANIFEST}), and {needed_by} needs its "
            f"output; run `{STAGE_COMMAND[stage]} --config {config_path}` first")
    if manifest.get("stage") != stage:
        raise ArtifactError(f"{stage_dir / MANIFEST}: holds a '{manifest.get('stage')}' stage, not '{stage}'")
    final = stage_dir / manifest.get("final", "final")
    if not final.is_dir():
        raise ArtifactError(f"{final}: missing although {stage_dir / MANIFEST} says the stage finished; "
                            f"delete {MANIFEST} and re-run `{STAGE_COMMAND[stage]}`")
    return final


def final_of_stage_dir(path: str | Path, *, needed_by: str) -> Path | None:
    """`final/` when `path` is a stage dir (it holds the manifest; checked as `stage_output` checks it), else
    None: every command that takes a model accepts a stage dir for its final model."""
    path = Path(path).expanduser()
    if not (path / MANIFEST).is_file():
        return None
    stage = (read_manifest(path) or {}).get("stage", path.name)
    return stage_output(path, stage, needed_by=needed_by)


def checkpoint_step(path: Path) -> int | None:
    match = CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written ones (no completion marker) are skipped."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in ckpt_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return [p for _, p in sorted(found) if (p / COMPLETE_MARKER).is_file()]


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    done = list_checkpoints(ckpt_dir)
    return done[-1] if done else None


def mark_checkpoint_complete(path: str | Path, step: int) -> None:
    write_json_atomic(Path(path) / COMPLETE_MARKER, {"step": step, "time": time.time()})


def remove_incomplete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Delete checkpoint dirs that were never completed (a kill during save). Returns what was removed."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed = []
    for path in ckpt_dir.iterdir():
        if path.is_dir() and checkpoint_step(path) is not None and not (path / COMPLETE_MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
