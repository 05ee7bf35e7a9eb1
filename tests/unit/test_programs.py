"""Program rewards (`rlhf.programs`): the prompt rows' fields reach the function by name, and each way a
program can fail is one line naming the function and, where one row is to blame, that row."""

from __future__ import annotations

import pytest

from rlhf.errors import ConfigError, TrainingError
from rlhf.programs import Program, load_program

ROWS = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "fields": {"answer": "5", "level": 1},
         "where": "qs.jsonl:1"},
        {"prompt": [{"role": "user", "content": "What is 4 + 4?"}], "fields": {"answer": "8", "level": 2},
         "where": "qs.jsonl:2"},
        {"prompt": [{"role": "user", "content": "Say hi."}]}]  # a row without fields


def test_fields_reach_the_function_by_name_or_all_with_kwargs():
    got = {}

    def named(prompts, responses, answer):
        got["named"] = (prompts, answer)
        return [float(a is not None and a in r) for a, r in zip(answer, responses, strict=True)]

    def everything(prompts, responses, **fields):
        got["kwargs"] = fields
        return [0.0] * len(responses)

    def plain(prompts, responses):
        return [len(r) for r in responses]

    responses = ["It is 5.", "It is 9.", "hi"]
    assert Program("m:named", named)(ROWS, responses) == [1.0, 0.0, 0.0]
    assert got["named"] == ([row["prompt"] for row in ROWS], ["5", "8", None])
    Program("m:everything", everything)(ROWS, responses)
    assert got["kwargs"] == {"answer": ["5", "8", None], "level": [1, 2, None]}
    assert Program("m:plain", plain)(ROWS, responses) == [8.0, 8.0, 2.0]


def test_a_raising_program_is_blamed_on_the_row_that_fails():
    def picky(prompts, responses, level):
        if any(lv == 2 for lv in level):
            raise ValueError("level 2 is not supported\nsecond line")
        return [1.0] * len(responses)

    with pytest.raises(TrainingError) as err:
        Program("mod:picky", picky, "ppo.rewards")(ROWS, ["a", "b", "c"])
    assert str(err.value) == ("ppo.rewards: mod:picky raised ValueError: level 2 is not supported on prompt row "
                              "qs.jsonl:2; fix the function")


def test_wrong_counts_and_values_are_one_line_each():
    with pytest.raises(TrainingError, match=r"^ppo.reward_fn: m:short returned 2 values for 3 responses; return one"):
        Program("m:short", lambda p, r: [1.0, 2.0], "ppo.reward_fn")(ROWS, ["a", "b", "c"])
    with pytest.raises(TrainingError, match=r"^ppo.rewards: m:text returned 'good' for prompt row 'Say hi.'; return a"):
        Program("m:text", lambda p, r: [1.0, 2.0, "good"])(ROWS, ["a", "b", "c"])
    with pytest.raises(TrainingError, match=r"^ppo.rewards: m:none returned NoneType, not a list of floats"):
        Program("m:none", lambda p, r: None)(ROWS, ["a", "b", "c"])
    # NaN is a number: the stage's non-finite guard decides (and names the source and row)
    assert Program("m:nan", lambda p, r: [float("nan")] * 3)(ROWS, ["a", "b", "c"])[0] != 0.0


def test_load_program_names_the_key():
    assert load_program("math:sqrt")(4.0) == 2.0
    with pytest.raises(ConfigError, match=r"^ppo.rewards: cannot import 'nosuchmodule:f' \("):
        load_program("nosuchmodule:f")
    with pytest.raises(ConfigError, match=r"^ppo.rewards: 'math:pi' is not callable$"):
        load_program("math:pi")
