"""`rlhf eval --judge` passes the judge the prompt rows' fields it names, as a program reward gets them:
`rlhf.tasks.arithmetic:exact_number` reads each row's `answer`, and its mean is exact-match accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.config import config_from_dict

HERE = Path(__file__).parent


def _cfg(tmp_path: Path, model_dir) -> dict:
    rows = [{"prompt": "What is 1 plus 1? Answer with the number only.", "answer": "2"},
            {"prompt": "What is 2 times 3? Answer with the number only.", "answer": "6"},
            {"prompt": "What is 9 minus 8? Answer with the number only.", "answer": "1"}]
    path = tmp_path / "prompts_eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"run": {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
            "model": {"name_or_path": str(model_dir)},
            "data": {"prompts": str(path), "prompts_eval": str(path), "max_prompt_length": 64},
            "final_stage": "ppo", "ppo": {"max_new_tokens": 4}, "logging": {"progress": False}}


def test_judge_gets_the_answer_field(tmp_path, tiny_model_dir, monkeypatch):
    from rlhf.commands.evaluation import run_eval

    monkeypatch.syspath_prepend(str(HERE))  # the judge: answer_judge:the_answer
    result = run_eval(config_from_dict(_cfg(tmp_path, tiny_model_dir), source="test"), judge="answer_judge:the_answer")
    (base,) = result["models"]
    assert base["model"] == "base" and result["prompts"] == 3
    assert base["judge"] == (2 + 6 + 1) / 3  # each response scored by its own row's answer, in order
    judged = [json.loads(line)["judge"] for line in (tmp_path / "runs/t/eval/responses.jsonl").read_text().splitlines()]
    assert judged == [2.0, 6.0, 1.0]


def test_exact_number_is_accuracy(tmp_path, tiny_model_dir):
    from rlhf.commands.evaluation import run_eval
    from rlhf.tasks.arithmetic import exact_number

    result = run_eval(config_from_dict(_cfg(tmp_path, tiny_model_dir), source="test"),
                      judge="rlhf.tasks.arithmetic:exact_number")
    responses = [json.loads(line) for line in (tmp_path / "runs/t/eval/responses.jsonl").read_text().splitlines()]
    expected = exact_number([r["prompt"] for r in responses], [r["response"] for r in responses], ["2", "6", "1"])
    assert [r["judge"] for r in responses] == expected
    assert result["models"][0]["judge"] == sum(expected) / 3
