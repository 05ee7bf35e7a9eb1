"""Which rows a stage reads: its data source after the documented fallbacks, and its train/held-out split.

Every stage, `rlhf eval` and `rlhf data inspect` find their rows here, so they agree on what was trained on
and what was held out.
"""

from __future__ import annotations

import logging
import random

from rlhf.data.sources import label, mix
from rlhf.data.validate import load, load_parts

log = logging.getLogger("rlhf")

# Which data each stage reads: (config key, data kind).
STAGE_DATA = {
    "sft": ("sft", "sft"),
    "reward": ("preference", "preference"),
    "dpo": ("preference", "preference"),
    "orpo": ("preference", "preference"),
    "ppo": ("prompts", "prompt"),
}
# The config key of the held-out rows of each data kind.
EVAL_KEY = {"sft": "sft_eval", "preference": "preference_eval", "prompt": "prompts_eval"}


def data_source(cfg, stage: str) -> tuple[str | None, str, str]:
    """(path, config key, kind) of the data a stage trains on, after the documented fallbacks. `cfg`: a
    `rlhf.config.PipelineConfig` (not imported, even for the type: `rlhf.config` imports this module)."""
    key, kind = STAGE_DATA[stage]
    path = getattr(cfg.data, key)
    if path is None and key == "sft" and cfg.data.preference:
        return cfg.data.preference, "data.preference", kind  # SFT on the chosen responses
    if path is None and key == "prompts" and cfg.data.preference:
        return cfg.data.preference, "data.preference", kind  # PPO on the preference prompts
    return path, f"data.{key}", kind


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval split; at least one eval row when fraction > 0 and there are 2+ rows."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * fraction)))
    eval_idx = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [r for i, r in enumerate(rows) if i in eval_idx]


def load_rows(cfg, stage: str, kind: str) -> tuple[list[dict], list[dict], str]:
    """Train and eval rows (internal schema) for a stage, with the configured bad-row policy, and the
    source's label.

    Each part of a mixed source is held out on its own before the parts are mixed by weight, so a row
    repeated by a weight above 1 never lands on both sides; held-out rows are not repeated.
    """
    source, key, _ = data_source(cfg, stage)
    options = {"split": cfg.data.split, "bad_rows": cfg.data.bad_rows}
    results = load_parts(source, kind, **options)
    for result in results:
        if result.n_skipped:
            log.warning("%s: skipped %d bad rows (data.bad_rows=skip); first: %s", result.source, result.n_skipped,
                        result.skipped[0] if result.skipped else "")
    weights, seed = [r.weight for r in results], cfg.run.seed
    eval_source = getattr(cfg.data, EVAL_KEY[kind])
    if eval_source:
        train_parts = [r.rows for r in results]
        eval_rows = load(eval_source, kind, seed=seed, **options).rows
    else:
        splits = [split_rows(r.rows, cfg.data.eval_fraction, seed) for r in results]
        train_parts = [train for train, _ in splits]
        eval_rows = mix([held for _, held in splits], [min(w, 1.0) for w in weights], seed)
    train_rows = mix(train_parts, weights, seed)
    if len(results) > 1 or weights != [1.0]:
        shares = ", ".join(f"{r.source} {len(rows)} rows x{r.weight:g}" for r, rows in zip(results, train_parts,
                                                                                           strict=True))
        log.info("%s: mixed %d training rows from %s", key, len(train_rows), shares)
    return train_rows, eval_rows, label(source)
