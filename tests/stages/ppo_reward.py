"""Programmatic PPO rewards for tests, named in config as `ppo.reward_fn: ppo_reward:<name>`.

Each takes (prompts, responses) and returns one float per response.
"""

from __future__ import annotations

TARGET = "e"


def target_share(prompts: list, responses: list[str]) -> list[float]:
    """Share of the response's non-space characters that are the letter `e` (0 for an empty response).

    A byte-level BPE policy can raise it by sampling the many tokens made of or rich in `e`, so a random
    tiny model starts near the corpus rate (~0.1) and PPO has a dense signal to climb.
    """
    out = []
    for text in responses:
        chars = [c for c in text if not c.isspace()]
        out.append(sum(c == TARGET for c in chars) / len(chars) if chars else 0.0)
    return out


def nan_reward(prompts: list, responses: list[str]) -> list[float]:
    """A broken reward function: NaN for every response (the stage must stop with a TrainingError)."""
    return [float("nan")] * len(responses)


CALLS: list[dict] = []


def answer_seen(prompts: list, responses: list[str], answer: list) -> list[float]:
    """1 when the row's `answer` field (a string) occurs in the response, else 0; records what it got."""
    CALLS.append({"prompts": prompts, "answer": answer})
    return [float(str(a) in text) for a, text in zip(answer, responses, strict=True)]


def recorded_zero(prompts: list, responses: list[str]) -> list[float]:
    """0 for every response; appends this rank's prompts (their last message) as one JSON line to
    $RLHF_TEST_CALLS/rank<RANK>.jsonl, so a launched run shows which prompts each rank scored together."""
    import json
    import os
    from pathlib import Path

    path = Path(os.environ["RLHF_TEST_CALLS"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps([p[-1]["content"] for p in prompts]) + "\n")
    return [0.0] * len(responses)
