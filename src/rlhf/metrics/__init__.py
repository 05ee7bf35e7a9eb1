"""Metrics shipped as `evaluate` modules, loaded by path so they work offline.

    import rlhf.metrics
    acc = rlhf.metrics.load("preference_accuracy")
    acc.compute(predictions=[1.0, 0.2], references=[0.5, 0.4])   # {'preference_accuracy': 0.5}

Names: preference_accuracy, reward_margin, reward_stats.
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("preference_accuracy", "reward_margin", "reward_stats")


def path(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown metric '{name}'; available: {', '.join(NAMES)}")
    return str(Path(__file__).with_name(f"{name}.py"))


def load(name: str):
    import evaluate

    return evaluate.load(path(name))


def preference_report(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Accuracy, margin mean/std and reward mean/std (over both sides) of scored pairs."""
    out: dict[str, float] = {}
    out.update(load("preference_accuracy").compute(predictions=chosen, references=rejected))
    out.update(load("reward_margin").compute(predictions=chosen, references=rejected))
    out.update(load("reward_stats").compute(predictions=list(chosen) + list(rejected)))
    return out
