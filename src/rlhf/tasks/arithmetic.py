"""Arithmetic questions with one numeric answer, and `exact_number`, the program that checks a reply.

Questions read "What is 7 plus 5? Answer with the number only." with the answer "12". A level fixes
the operands and operations (`LEVELS`); every question of a level is one (a, operation, b), and a split
draws distinct questions without replacement, so the training and held-out prompts never share a question
(nor its text: the text is a function of the question). Level 1 (single digits) is the one the base model
(SmolLM2-135M-Instruct) sometimes gets right: a reward that is never 1 has nothing to teach. Measured on
it, sampled at temperature 0.7: single-digit sums 22% +- 5%, two-digit plus one-digit 2%, three-digit
minus two-digit 0 of 100 (greedy figures of level 1 beside `LEVELS`).

    python -m rlhf.tasks.arithmetic --out data/grpo_math --seed 0 --n-train 200 --n-eval 200 --level 1

writes `prompts.jsonl` (training) and `prompts_eval.jsonl` (held-out), rows `{"prompt", "answer"}`, and
`manifest.json` (the command's settings and counts). The same arguments write the same files.

`exact_number(prompts, responses, answer)` is 1.0 when the last number in a reply equals the answer, else
0.0 (how a reply is read: `last_number`). It is both the final stage's reward (`ppo.rewards`, which
passes the rows' `answer` field because the function names it) and the eval judge
(`rlhf eval --judge rlhf.tasks.arithmetic:exact_number`), whose mean is then exact-match accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

__all__ = ["LEVELS", "Question", "questions", "split", "last_number", "exact_number"]

INSTRUCTION = "Answer with the number only."
_WORDS = {"+": "plus", "-": "minus", "*": "times"}


@dataclass(frozen=True)
class Family:
    """Questions `a op b` with a from `a_range`, b from `b_range`; a minus question keeps a >= b, so every
    answer is a non-negative integer."""

    op: str
    a_range: range
    b_range: range


@dataclass(frozen=True)
class Level:
    families: tuple[Family, ...]
    about: str


# Level 1 is where SmolLM2-135M-Instruct is right some of the time: greedy, ChatML, 16 new tokens, it answered
# 25% of the 100 single-digit sums right, 27% of the 55 single-digit differences, 30% of the 100 single-digit
# products and 32% of the 100 sums of 10..19 and a digit (and 0 of 45 differences with a negative answer).
LEVELS = {
    1: Level((Family("+", range(0, 20), range(0, 10)), Family("-", range(0, 20), range(0, 10)),
              Family("*", range(0, 10), range(0, 10))),
             "0-19 plus or minus a digit, a digit times a digit (455 questions)"),
    2: Level((Family("+", range(10, 100), range(0, 10)), Family("-", range(10, 100), range(0, 10))),
             "two-digit plus or minus one-digit"),
    3: Level((Family("+", range(100, 1000), range(10, 100)), Family("-", range(100, 1000), range(10, 100))),
             "three-digit plus or minus two-digit"),
}


@dataclass(frozen=True)
class Question:
    a: int
    op: str
    b: int

    @property
    def text(self) -> str:
        return f"What is {self.a} {_WORDS[self.op]} {self.b}? {INSTRUCTION}"

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    def row(self) -> dict:
        return {"prompt": self.text, "answer": str(self.answer)}


def questions(level: int) -> list[Question]:
    """Every question of `level`, in a fixed order."""
    if level not in LEVELS:
        raise ValueError(f"level {level}: expected one of {sorted(LEVELS)}")
    return [Question(a, f.op, b) for f in LEVELS[level].families for a in f.a_range for b in f.b_range
            if not (f.op == "-" and a < b)]


def split(level: int, n_train: int, n_eval: int, seed: int) -> tuple[list[Question], list[Question]]:
    """(training, held-out) questions: n_train + n_eval distinct questions of `level` drawn by `seed`, the
    held-out ones first, so a larger n_train leaves the held-out set as it was."""
    pool = questions(level)
    if n_train < 0 or n_eval < 0 or n_train + n_eval > len(pool):
        raise ValueError(f"level {level} has {len(pool)} distinct questions; cannot draw {n_train} training and "
                         f"{n_eval} held-out ones without repeating a question")
    random.Random(seed).shuffle(pool)
    return pool[n_eval:n_eval + n_train], pool[:n_eval]


# ------------------------------------------------------------------------------------------------ reward

# A number as a reply writes it: an optional minus sign that does not join two words or digits ("7-5" is 7
# and 5), digits with optional thousands commas ("1,234"; "3,4" is two numbers), an optional decimal part
# ("12.0"; a sentence's full stop after "12." is not one, it needs a digit after the point).
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def last_number(text: str) -> Fraction | None:
    """The last number written in digits in `text` (as an exact fraction), or None when there is none.

    `The answer is "12".` -> 12; `7 + 5 = 12` -> 12; `1,234` -> 1234; `-3` -> -3; `12.0` -> 12;
    `twelve` -> None (numbers in words are not read). The last one counts because replies often restate
    the question first ("7 plus 5 is 12")."""
    found = _NUMBER.findall(text)
    return Fraction(found[-1].replace(",", "")) if found else None


def exact_number(prompts: Sequence, responses: Sequence[str], answer: Sequence) -> list[float]:
    """1.0 for each response whose last number (`last_number`) equals its row's `answer`, else 0.0."""
    if not len(prompts) == len(responses) == len(answer):
        raise ValueError(f"exact_number: {len(prompts)} prompts, {len(responses)} responses, {len(answer)} answers")
    scores = []
    for i, (response, expected) in enumerate(zip(responses, answer, strict=True)):
        if expected is None:
            raise ValueError(f"exact_number: prompt row {i} has no `answer` field")
        target = last_number(str(expected))
        if target is None:
            raise ValueError(f"exact_number: prompt row {i}: answer {expected!r} is not a number")
        scores.append(1.0 if last_number(response) == target else 0.0)
    return scores


# -------------------------------------------------------------------------------------------------- CLI


def write(out: Path, level: int, n_train: int, n_eval: int, seed: int) -> dict:
    """Write prompts.jsonl, prompts_eval.jsonl and manifest.json under `out`; returns the manifest."""
    train, held_out = split(level, n_train, n_eval, seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("prompts.jsonl", train), ("prompts_eval.jsonl", held_out)):
        with open(out / name, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(q.row()) + "\n" for q in rows)
    manifest = {"command": f"python -m rlhf.tasks.arithmetic --out {out} --seed {seed} --n-train {n_train} "
                           f"--n-eval {n_eval} --level {level}",
                "level": level, "about": LEVELS[level].about, "seed": seed, "questions_in_level": len(questions(level)),
                "train": len(train), "eval": len(held_out),
                "ops": {f.op: sum(q.op == f.op for q in train + held_out) for f in LEVELS[level].families}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.tasks.arithmetic",
                                     description="write seeded arithmetic prompts with answers (train and held-out)")
    parser.add_argument("--out", required=True, type=Path, help="directory for prompts.jsonl and prompts_eval.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=200)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--level", type=int, default=1, choices=sorted(LEVELS),
                        help="; ".join(f"{k}: {v.about}" for k, v in LEVELS.items()))
    args = parser.parse_args(argv)
    try:
        manifest = write(args.out, args.level, args.n_train, args.n_eval, args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(f"{args.out}: {manifest['train']} training and {manifest['eval']} held-out questions "
          f"(level {args.level}: {manifest['about']}; {manifest['questions_in_level']} in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
