"""Length bias in preference data and in win rates: pure functions, standard library only.

A reward model (or DPO) trained on pairs whose chosen side is nearly always the longer one learns
"longer is better" (Singhal et al. 2023, https://arxiv.org/abs/2310.03716); the mirror case, chosen
nearly always shorter, teaches "shorter is better" just as well. Both are checked here, together with
the correlation between the pair's length difference and its margin (a margin that mostly measures
length). `rlhf data inspect`, preflight (`data.verbosity`) and `rlhf data synth` measure each response
with `response_length` and judge the pairs with `length_bias` and `warnings`, so they give one answer
for one file and one unit; `rlhf eval` uses `length_controlled_win_rate` next to the raw win rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SHARE_THRESHOLD = 0.75
"""Warn when chosen is longer (or shorter) in at least this share of pairs..."""
RATIO_THRESHOLD = 1.10
"""...and the mean chosen length is at least this many times the mean rejected length (or at most its
inverse, 0.91): chosen 3% longer in every pair is a difference no reward model needs to learn."""
CORR_THRESHOLD = 0.5
"""Warn when |Pearson r| between length difference and margin is at least this..."""
CORR_MIN_PAIRS = 10
"""...over at least this many pairs with a margin."""


def response_length(text: str, tokenizer: Any = None) -> int:
    """The length of one response's text: its tokens under `tokenizer` (the text alone: no special tokens,
    no chat template), or whitespace-separated words without one. Callers pass the response only, never
    the prompt, so a long shared prompt cannot hide a difference."""
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class LengthBias:
    """How chosen and rejected lengths relate over a set of pairs."""

    n: int
    """Pairs."""
    chosen_longer: float
    """Share of pairs where chosen is strictly longer than rejected."""
    chosen_shorter: float
    """Share of pairs where chosen is strictly shorter."""
    length_ratio: float
    """Mean chosen length / mean rejected length (inf when every rejected side is empty): above 1 exactly
    when `mean_diff` is above 0."""
    mean_diff: float
    """Mean of len(chosen) - len(rejected)."""
    margin_corr: float | None = None
    """Pearson r between len(chosen) - len(rejected) and the pair's margin; None without margins, with
    fewer than 3 of them, or when either side does not vary."""
    n_margins: int = 0
    """Pairs that have a margin."""
    unit: str = "words"
    """What a length counts: "tokens" (the policy's tokenizer) or "words"."""


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation of two equally long sequences; None for fewer than 3 values or no variance."""
    if len(xs) != len(ys):
        raise ValueError(f"pearson: {len(xs)} x values but {len(ys)} y values")
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def length_bias(chosen: Sequence[int], rejected: Sequence[int],
                margins: Sequence[float | None] | None = None, unit: str = "words") -> LengthBias | None:
    """Length statistics of pairs, lengths in `unit` (from `response_length`); `margins[i]` None where pair
    i has none. None for no pairs."""
    if len(chosen) != len(rejected):
        raise ValueError(f"length_bias: {len(chosen)} chosen but {len(rejected)} rejected lengths")
    n = len(chosen)
    if n == 0:
        return None
    pairs = list(zip(chosen, rejected, strict=True))
    with_margin = [(c - r, m) for (c, r), m in zip(pairs, margins or [None] * n, strict=True) if m is not None]
    corr = pearson([d for d, _ in with_margin], [m for _, m in with_margin]) if with_margin else None
    total_chosen, total_rejected = sum(chosen), sum(rejected)
    # A ratio of means, not a mean of ratios: the mean of c/r can exceed 1 while chosen is shorter on average
    # (short rejected sides weigh most), and a message with ratio 3.8 next to a difference of -1.7 says nothing.
    ratio = total_chosen / total_rejected if total_rejected else (math.inf if total_chosen else 1.0)
    return LengthBias(n=n, chosen_longer=sum(c > r for c, r in pairs) / n,
                      chosen_shorter=sum(c < r for c, r in pairs) / n, length_ratio=ratio,
                      mean_diff=(total_chosen - total_rejected) / n, margin_corr=corr, n_margins=len(with_margin),
                      unit=unit)


def describe(bias: LengthBias) -> str:
    """One line: both directions, ratio and difference of the mean lengths and (when known) the correlation
    with the margin."""
    line = (f"chosen longer in {bias.chosen_longer:.0%} of pairs, shorter in {bias.chosen_shorter:.0%}; mean "
            f"length chosen/rejected {bias.length_ratio:.2f}x, difference {bias.mean_diff:+.1f} {bias.unit}")
    if bias.margin_corr is not None:
        line += f"; length difference vs margin r = {bias.margin_corr:+.2f} ({bias.n_margins} pairs)"
    return line


def warnings(bias: LengthBias | None) -> list[str]:
    """Plain-language warnings for a length bias in either direction (a share of pairs and a ratio of mean
    lengths past their thresholds, both the same way), and for a margin that tracks length."""
    if bias is None:
        return []
    out = []
    for share, side, lesson, bound, biased in (
            (bias.chosen_longer, "longer", "longer is better", f">= {RATIO_THRESHOLD:.2f}",
             bias.length_ratio >= RATIO_THRESHOLD),
            (bias.chosen_shorter, "shorter", "shorter is better", f"<= {1 / RATIO_THRESHOLD:.2f}",
             bias.length_ratio <= 1 / RATIO_THRESHOLD)):
        if share >= SHARE_THRESHOLD and biased:
            out.append(f"verbosity bias: chosen is {side} in {share:.0%} of pairs and {bias.length_ratio:.2f}x the "
                       f"rejected length on average ({bias.mean_diff:+.1f} {bias.unit}); a reward model trained on "
                       f"this may learn '{lesson}' (warned at >= {SHARE_THRESHOLD:.0%} of pairs with a mean length "
                       f"ratio {bound})")
    r = bias.margin_corr
    if r is not None and bias.n_margins >= CORR_MIN_PAIRS and abs(r) >= CORR_THRESHOLD:
        out.append(f"verbosity bias: the pair margin tracks the length difference (r = {r:+.2f} over "
                   f"{bias.n_margins} pairs); a margin-weighted reward model learns length along with the "
                   f"margin (warned at |r| >= {CORR_THRESHOLD})")
    return out


# -------------------------------------------------------------------------------------- win rates


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def length_controlled_win_rate(scores: Sequence[float], base_scores: Sequence[float], lengths: Sequence[float],
                               base_lengths: Sequence[float], *, l2: float = 1e-3) -> float | None:
    """The win rate against the baseline at equal length, the idea of AlpacaEval's length-controlled
    win rate (Dubois et al. 2024, https://arxiv.org/abs/2404.04475) without its per-model terms.

    Per prompt the outcome y is 1 (the model's score is higher), 0.5 (tie) or 0, and d = tanh of the
    length difference (model - baseline) divided by its standard deviation over the prompts. A logistic
    regression P(win) = sigmoid(a + b d) is fitted by Newton's method (a small L2 penalty keeps it finite
    when every prompt is won); the result is sigmoid(a), its prediction at d = 0. With no length
    difference at all it is the raw win rate. None for fewer than 2 prompts.
    """
    n = len(scores)
    if not (n == len(base_scores) == len(lengths) == len(base_lengths)):
        raise ValueError("length_controlled_win_rate: the four sequences must be equally long")
    if n < 2:
        return None
    ys = [1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, base_scores, strict=True)]
    diffs = [x - y for x, y in zip(lengths, base_lengths, strict=True)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    ds = [math.tanh(d / sd) if sd > 0 else 0.0 for d in diffs]
    a = b = 0.0
    for _ in range(100):
        ps = [_sigmoid(a + b * d) for d in ds]
        ga = sum(p - y for p, y in zip(ps, ys, strict=True)) + l2 * a
        gb = sum((p - y) * d for p, y, d in zip(ps, ys, ds, strict=True)) + l2 * b
        ws = [p * (1 - p) for p in ps]
        haa, hab = sum(ws) + l2, sum(w * d for w, d in zip(ws, ds, strict=True))
        hbb = sum(w * d * d for w, d in zip(ws, ds, strict=True)) + l2
        det = haa * hbb - hab * hab
        step_a, step_b = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        shrink = max(1.0, abs(step_a) / 5, abs(step_b) / 5)  # damped: no overshoot far into a flat tail
        a, b = a - step_a / shrink, b - step_b / shrink
        if abs(step_a) + abs(step_b) < 1e-10:
            break
    return _sigmoid(a)
