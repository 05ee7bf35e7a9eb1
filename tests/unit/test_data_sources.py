"""Sources: `columns` key mapping, several parts per split mixed by weight, and how stages split them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.config import config_from_dict
from rlhf.data import check_source, label, load, mix
from rlhf.errors import DataError


def _write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _pairs(n: int, tag: str) -> list[dict]:
    return [{"question": f"{tag} q{i}", "response_j": f"good {i}", "response_k": f"bad {i}"} for i in range(n)]


OPENRLHF = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}


def test_columns_map_a_files_own_keys_onto_the_schema(tmp_path):
    path = _write(tmp_path / "se.jsonl", _pairs(2, "a"))
    rows = load({"path": path, "columns": OPENRLHF}, "preference").rows
    assert rows[1] == {"prompt": [{"role": "user", "content": "a q1"}], "chosen": [{"role": "assistant", "content": "good 1"}],
                       "rejected": [{"role": "assistant", "content": "bad 1"}]}
    with pytest.raises(DataError, match=r"unrecognized row keys \(question, response_j, response_k\)"):
        load(path, "preference")  # unmapped, the keys are unknown


def test_a_row_without_a_mapped_key_names_file_and_line(tmp_path):
    path = _write(tmp_path / "se.jsonl", [*_pairs(1, "a"), {"query": "q", "response_j": "g", "response_k": "b"}])
    with pytest.raises(DataError) as info:
        load({"path": path, "columns": OPENRLHF}, "preference")
    assert str(info.value) == (f"{path}:2: no 'question' in this row (columns map it to 'prompt'); "
                               "row keys: query, response_j, response_k")
    # An optional key may be missing: rows without the mapped system prompt still load.
    sys_path = _write(tmp_path / "sys.jsonl", [{"q": "hi", "a": "yo", "sys": "Be brief."}, {"q": "hi", "a": "yo"}])
    rows = load({"path": sys_path, "columns": {"instruction": "q", "output": "a", "system": "sys"}}, "sft").rows
    assert [len(r["prompt"]) for r in rows] == [2, 1]


def test_columns_onto_an_unknown_key_is_an_error(tmp_path):
    path = _write(tmp_path / "se.jsonl", _pairs(1, "a"))
    with pytest.raises(DataError, match=r"columns map 'question', which no format reads"):
        load({"path": path, "columns": {"question": "prompt"}}, "preference")


def test_parts_are_mixed_by_weight_with_a_seed(tmp_path):
    a = _write(tmp_path / "a.jsonl", _pairs(10, "a"))
    b = _write(tmp_path / "b.jsonl", _pairs(3, "b"))
    source = [{"path": a, "weight": 0.5, "columns": OPENRLHF}, {"path": b, "weight": 2, "columns": OPENRLHF}]
    result = load(source, "prompt", seed=1)
    prompts = [r["prompt"][0]["content"] for r in result.rows]
    assert sum(p.startswith("a ") for p in prompts) == 5 and len(set(p for p in prompts if p.startswith("a "))) == 5
    assert sorted(p for p in prompts if p.startswith("b ")) == ["b q0", "b q0", "b q1", "b q1", "b q2", "b q2"]
    assert [(p.source, p.weight, len(p.rows)) for p in result.parts] == [(a, 0.5, 10), (b, 2.0, 3)]
    assert result.source == label(source) == f"{a} (x0.5) + {b} (x2)"
    assert load(source, "prompt", seed=1).rows == result.rows  # seeded
    assert load(source, "prompt", seed=2).rows != result.rows
    assert mix([[1, 2, 3, 4]], [1.5], seed=0)[:4] == [1, 2, 3, 4]  # 1.5: every row, then a random half


def test_check_source_checks_every_part(tmp_path):
    good = _write(tmp_path / "good.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        check_source([good, str(tmp_path / "missing.jsonl")], "sft")
    assert check_source([good, {"path": good}], "sft") == "prompt_completion + prompt_completion"


def test_stage_rows_hold_out_each_part_before_mixing(tmp_path):
    from rlhf.data import load_rows

    a = _write(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(10)])
    b = _write(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "completion": "x"} for i in range(10)])
    cfg = config_from_dict({"data": {"sft": [{"path": a, "weight": 3}, b], "eval_fraction": 0.2}})
    train, held_out, where = load_rows(cfg, "sft", "sft")
    prompt = lambda row: row["prompt"][0]["content"]  # noqa: E731
    assert len(train) == 8 * 3 + 8 and len(held_out) == 2 + 2  # held-out rows are not repeated
    assert not {prompt(r) for r in train} & {prompt(r) for r in held_out}
    assert where == f"{a} (x3) + {b}"
