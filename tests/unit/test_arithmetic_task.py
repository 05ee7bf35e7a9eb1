"""rlhf.tasks.arithmetic: the reply parser, the reward and the seeded question generator, by hand."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from rlhf.tasks import arithmetic
from rlhf.tasks.arithmetic import Question, exact_number, last_number, questions, split


@pytest.mark.parametrize("text, expected", [
    ('The answer is "12".', 12),            # quoted, with the sentence's full stop
    ("12", 12),
    ("7 plus 5 is 12.", 12),                # the question restated first: the last number counts
    ("7 + 5 = 12", 12),
    ("7-5=2", 2),                           # a minus between digits is an operator, not a sign
    ("The answer is -3.", -3),
    ("x = -3", -3),
    ("1,234", 1234),                        # thousands separators
    ("It is 12,345,678!", 12345678),
    ("3,4", 4),                             # not a thousands group: two numbers
    ("12.0", 12),                           # a decimal equal to an integer
    ("about 2.5", Fraction(5, 2)),
    ("The answer is 12. Or maybe 13", 13),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


@pytest.mark.parametrize("text", ["", "twelve", "The answer is unknown."])
def test_last_number_none(text):
    assert last_number(text) is None


def test_exact_number_scores():
    prompts = [[{"role": "user", "content": "What is 7 plus 5?"}]] * 5
    responses = ['The answer is "12".', "12", "13", "twelve", "7 plus 5 is 12, not 11."]
    # 12 = 12 -> 1; 12 -> 1; 13 != 12 -> 0; no number -> 0; last number 11 != 12 -> 0
    assert exact_number(prompts, responses, ["12"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_exact_number_refuses_missing_answer():
    with pytest.raises(ValueError, match="row 1 has no `answer`"):
        exact_number(["p", "q"], ["1", "2"], ["1", None])
    with pytest.raises(ValueError, match="3 answers"):
        exact_number(["p"], ["1"], ["1", "2", "3"])


def test_exact_number_through_program_gets_answer_field():
    """Called as the final stage and `rlhf eval --judge` call it: the `answer` field comes from the row."""
    from rlhf.programs import Program

    rows = [{"prompt": [{"role": "user", "content": "What is 2 times 3?"}], "fields": {"answer": "6"}},
            {"prompt": [{"role": "user", "content": "What is 9 minus 4?"}], "fields": {"answer": "5"}}]
    program = Program("rlhf.tasks.arithmetic:exact_number", exact_number)
    assert program(rows, ["The answer is 6.", "4"]) == [1.0, 0.0]


def test_question_text_and_answer():
    assert Question(7, "+", 5).row() == {"prompt": "What is 7 plus 5? Answer with the number only.", "answer": "12"}
    assert Question(13, "-", 4).row() == {"prompt": "What is 13 minus 4? Answer with the number only.", "answer": "9"}
    assert Question(6, "*", 7).row() == {"prompt": "What is 6 times 7? Answer with the number only.", "answer": "42"}


def test_level_one_questions():
    qs = questions(1)
    # plus: 20 x 10 = 200; minus with a >= b: 55 (a < 10) + 100 (a >= 10) = 155; times: 10 x 10 = 100
    assert len(qs) == len(set(qs)) == 455
    assert all(q.answer >= 0 for q in qs)
    assert all(q.answer == eval(f"{q.a} {q.op} {q.b}") for q in qs)  # noqa: S307 (digits and one operator)


def test_split_is_seeded_and_disjoint():
    train, held = split(1, 255, 200, seed=0)
    assert len(train) == 255 and len(held) == 200
    assert not {q.text for q in train} & {q.text for q in held}
    assert split(1, 255, 200, seed=0) == (train, held)
    assert split(1, 255, 200, seed=1) != (train, held)
    # the held-out questions are drawn first: fewer training questions leave them as they were
    assert split(1, 10, 200, seed=0)[1] == held


def test_split_refuses_more_than_the_level_has():
    with pytest.raises(ValueError, match="455 distinct questions"):
        split(1, 300, 200, seed=0)


def test_cli_writes_rows(tmp_path):
    assert arithmetic.main(["--out", str(tmp_path), "--seed", "3", "--n-train", "5", "--n-eval", "4"]) == 0
    train = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "prompts_eval.jsonl").read_text().splitlines()]
    assert len(train) == 5 and len(held) == 4
    for row in train + held:
        q = next(q for q in questions(1) if q.text == row["prompt"])
        assert row["answer"] == str(q.answer)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["train"] == 5 and manifest["eval"] == 4 and manifest["seed"] == 3


def test_rows_load_with_their_answer(tmp_path):
    """The prompt loader keeps `answer` as a field of the row, which is what the reward is passed."""
    from rlhf import data

    arithmetic.main(["--out", str(tmp_path), "--n-train", "2", "--n-eval", "1"])
    rows = data.load(str(tmp_path / "prompts.jsonl"), "prompt").rows
    assert [r["fields"]["answer"] for r in rows] == [json.loads(line)["answer"] for line in
                                                      (tmp_path / "prompts.jsonl").read_text().splitlines()]
