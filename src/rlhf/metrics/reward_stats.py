"""evaluate metric: mean and std of a set of rewards (stored with a reward model to normalize PPO scores)."""

import math

import datasets
import evaluate


class RewardStats(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean and (population) standard deviation of rewards.",
            citation="",
            inputs_description="predictions: rewards",
            features=datasets.Features({"predictions": datasets.Value("float32")}),
        )

    def _compute(self, predictions):
        n = len(predictions)
        if n == 0:
            return {"reward_mean": float("nan"), "reward_std": float("nan"), "n": 0}
        mean = sum(predictions) / n
        std = math.sqrt(sum((p - mean) ** 2 for p in predictions) / n)
        return {"reward_mean": mean, "reward_std": std, "n": n}
