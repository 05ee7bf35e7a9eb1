"""Gold judges: programs that score responses, independent of any trained reward model.

A judge has the signature of `ppo.reward_fn` and `rlhf eval --judge`:

    judge(prompts: list[list[dict]] | list[str], responses: list[str]) -> list[float]

Prompts come in the internal schema (a list of chat messages) or as plain strings; the judges here
read only the responses. Because a judge is a fixed program, it can check whether RLHF worked without
trusting the reward model that was trained to imitate it (the RM only ever sees the judge's labels on
base-model samples, through `rlhf data synth`).

`positivity` is the quickstart's judge: the VADER compound sentiment score (Hutto & Gilbert, 2014),
a lexicon- and rule-based analyzer whose 7,500-word lexicon ships inside the `vaderSentiment` PyPI
package, so it runs offline and deterministically. Scores lie in [-1, 1]: -1 very negative, 0 neutral
or empty, +1 very positive. It handles negation ("not good"), intensifiers ("very"), "but" clauses,
capitals and exclamation marks, which is enough to tell an upbeat reply from a grumpy one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

__all__ = ["positivity", "negativity"]


@functools.lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:  # a dependency of the package; missing only in a hand-made environment
        from rlhf.errors import ConfigError

        raise ConfigError("rlhf.judges: the vaderSentiment package is missing; run `pip install vaderSentiment`"
                          ) from err
    return SentimentIntensityAnalyzer()


def _compound(text: str) -> float:
    text = text.strip()
    return float(_analyzer().polarity_scores(text)["compound"]) if text else 0.0


def positivity(prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """VADER compound sentiment of each response, in [-1, 1] (higher is more positive)."""
    if len(prompts) != len(responses):
        raise ValueError(f"positivity: {len(prompts)} prompts but {len(responses)} responses")
    return [_compound(r) for r in responses]


def negativity(prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """The mirror task, -positivity: for checking that a pipeline can be steered either way."""
    return [-s for s in positivity(prompts, responses)]


# ------------------------------------------------------------------------------------------ comparison


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of at least 2 values (n - 1 in the variance)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, (var / len(values)) ** 0.5


def paired_difference(scores: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """(mean of scores - baseline, its standard error) over the same prompts (paired, n - 1 in the variance)."""
    if len(scores) != len(baseline) or len(scores) < 2:
        raise ValueError("paired_difference needs two equally long lists of at least 2 scores")
    return mean_and_se([a - b for a, b in zip(scores, baseline, strict=True)])


def compare(responses_path: str, baseline: str = "sft", key: str = "judge") -> list[dict]:
    """Per model of an `rlhf eval` responses.jsonl: mean `key` score and the paired difference to `baseline`.

    A model beats the baseline clearly when its difference exceeds twice the standard error.
    """
    import json

    by_model: dict[str, list[float]] = {}
    with open(responses_path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get(key) is not None:
                by_model.setdefault(rec["model"], []).append(float(rec[key]))
    if baseline not in by_model:
        raise ValueError(f"{responses_path}: no {key} scores for the baseline model {baseline!r}")
    rows = []
    for model, scores in by_model.items():
        row = {"model": model, "n": len(scores), "mean": sum(scores) / len(scores)}
        if model != baseline:
            row["diff"], row["se"] = paired_difference(scores, by_model[baseline])
            row["clear"] = row["diff"] > 2 * row["se"]
        rows.append(row)
    return rows


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rlhf.judges", description="gold-judge comparison of eval runs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="judge means and paired differences to a baseline, from responses.jsonl")
    p.add_argument("responses", help="<run>/eval/responses.jsonl written by `rlhf eval --judge ...`")
    p.add_argument("--baseline", default="sft")
    p.add_argument("--key", default="judge", choices=("judge", "reward"))
    args = parser.parse_args(argv)
    rows = compare(args.responses, args.baseline, args.key)
    print(f"{args.key} score vs {args.baseline} on the same {rows[0]['n']} held-out prompts (paired):")
    for r in rows:
        if "diff" in r:
            verdict = "above 2 SE" if r["clear"] else "within 2 SE"
            print(f"  {r['model']:<8} mean {r['mean']:+.3f}   diff {r['diff']:+.3f} +- {r['se']:.3f} (SE)   {verdict}")
        else:
            print(f"  {r['model']:<8} mean {r['mean']:+.3f}   (baseline)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
