"""evaluate metric: mean and std of reward(chosen) - reward(rejected) over preference pairs."""

import math

import datasets
import evaluate


class RewardMargin(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean and standard deviation of the reward margin chosen - rejected.",
            citation="",
            inputs_description="predictions: rewards of the chosen responses; references: rewards of the rejected ones",
            features=datasets.Features({"predictions": datasets.Value("float32"),
                                        "references": datasets.Value("float32")}),
        )

    def _compute(self, predictions, references):
        margins = [c - r for c, r in zip(predictions, references, strict=True)]
        n = len(margins)
        if n == 0:
            return {"reward_margin_mean": float("nan"), "reward_margin_std": float("nan")}
        mean = sum(margins) / n
        var = sum((m - mean) ** 2 for m in margins) / (n - 1) if n > 1 else 0.0
        return {"reward_margin_mean": mean, "reward_margin_std": math.sqrt(var)}
