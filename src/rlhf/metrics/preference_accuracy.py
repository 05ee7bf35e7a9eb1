"""evaluate metric: share of pairs whose chosen response scores higher than the rejected one.

Offline use: `evaluate.load(rlhf.metrics.path("preference_accuracy"))`, or `rlhf.metrics.load(...)`.
"""

import datasets
import evaluate


class PreferenceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of preference pairs where reward(chosen) > reward(rejected); ties count as wrong.",
            citation="",
            inputs_description="predictions: rewards of the chosen responses; references: rewards of the rejected ones",
            features=datasets.Features({"predictions": datasets.Value("float32"),
                                        "references": datasets.Value("float32")}),
        )

    def _compute(self, predictions, references):
        n = len(predictions)
        wins = sum(1 for c, r in zip(predictions, references, strict=True) if c > r)
        return {"preference_accuracy": wins / n if n else float("nan")}
