"""Write the tiny synthetic data sets in this directory: sft.jsonl, preference.jsonl, prompts.jsonl.

Deterministic (fixed seed, no inputs): `python data/tiny/make_tiny.py [OUT_DIR]` rewrites the same bytes.
Chosen responses are polite and positive ("glad", "great", "happy to help"); rejected ones are curt and
negative ("no", "bad", "whatever"). Both sides use templates of similar word counts, so a reward model
can separate them by content but not by length (low verbosity bias).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 1234
TOPICS = (
    "math", "cooking", "music", "gardening", "python", "chess", "painting", "running",
    "history", "physics", "poetry", "travel", "baking", "reading", "swimming", "drawing",
)  # fmt: skip
PROMPTS = (
    "Can you help me with {t}?",
    "What do you think about {t}?",
    "Tell me something about {t}.",
    "Is {t} worth learning?",
    "Any tips for {t}?",
    "How do I get better at {t}?",
    "Should I try {t} this week?",
    "Why do people like {t}?",
    "Where do I start with {t}?",
    "Is {t} hard for beginners?",
)
GOOD = (
    "Glad you asked! {T} is great, and I am happy to help.",
    "Great question. I am happy to help you with {t} today.",
    "Sure, I am glad to help. {T} is a great choice.",
    "Happy to help! {T} is fun and great to practice.",
)
BAD = (
    "No. {T} is bad, and I will not help you with that.",
    "Whatever. I do not care about {t}, go ask someone else.",
    "No, {t} is bad and boring, so go figure it out.",
    "Bad question. {T} is a waste of time, so whatever.",
)


def _fill(template: str, topic: str) -> str:
    """Put a topic into a template ({t} as is, {T} capitalized)."""
    return template.format(t=topic, T=topic.capitalize())


def build() -> dict[str, list[dict]]:
    """The three data sets as lists of rows, keyed by file name."""
    rng = random.Random(SEED)
    pairs = [(p, t) for p in PROMPTS[:8] for t in TOPICS]  # 128 distinct prompts
    rng.shuffle(pairs)
    preference = [
        {"prompt": _fill(p, t), "chosen": _fill(rng.choice(GOOD), t), "rejected": _fill(rng.choice(BAD), t)}
        for p, t in pairs
    ]
    sft = [{"prompt": _fill(p, t), "completion": _fill(rng.choice(GOOD), t)} for p, t in pairs[:64]]
    prompts = [{"prompt": _fill(p, t)} for p in PROMPTS[8:] for t in TOPICS]  # 32 prompts unseen above
    return {"sft.jsonl": sft, "preference.jsonl": preference, "prompts.jsonl": prompts}


def write(out_dir: Path) -> None:
    """Write every data set as JSON Lines under `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in build().items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out_dir / name).write_text(text, encoding="utf-8", newline="\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
