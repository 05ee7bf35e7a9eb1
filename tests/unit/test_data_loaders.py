"""Loaders: every source type, locations in messages, and the bad-input corpus."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from rlhf.data import iter_rows, load  # noqa: E402
from rlhf.errors import DataError  # noqa: E402

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
ROWS = [
    {"prompt": "Help me cook.", "chosen": "Glad to help!", "rejected": "No."},
    {"prompt": "Tips for chess?", "chosen": "Great question.", "rejected": "Whatever."},
]
CHAT_ROW = {
    "prompt": [{"role": "user", "content": "Hi, can you help?"}],
    "chosen": [{"role": "assistant", "content": "Happy to help!"}],
    "rejected": [{"role": "assistant", "content": "No, go away."}],
}


def _bad(name: str) -> str:
    return str(BAD / name)


def _make_bad():
    spec = importlib.util.spec_from_file_location("make_bad", BAD / "make_bad.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bad_corpus_on_disk_matches_generator():
    for name, data in _make_bad().CORPUS.items():
        assert (BAD / name).read_bytes() == data, f"{name} differs; rerun tests/data/bad/make_bad.py"


def test_jsonl_locations_are_physical_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert [loc for loc, _ in iter_rows(str(path))] == [f"{path}:2", f"{path}:5"]


@pytest.mark.parametrize("name", ["bom.jsonl", "crlf.jsonl"])
def test_bom_and_crlf_load(name):
    rows = list(iter_rows(_bad(name)))
    assert [row for _, row in rows] == [
        {"prompt": "Hi there", "chosen": "Glad to help!", "rejected": "No."},
        {"prompt": "Help me cook", "chosen": "Happy to help you cook.", "rejected": "Whatever."},
    ]
    assert load(_bad(name), "preference").n_read == 2
    if name == "crlf.jsonl":
        assert rows[1][0] == f"{_bad(name)}:3"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "truncated.jsonl",
            ":3: not valid JSON (Unterminated string starting at: column 28); each line must be one JSON object",
        ),
        ("non_utf8.jsonl", ":2: not valid UTF-8 (byte 0xe9 at column 32); re-encode the file as UTF-8"),
        ("not_object.jsonl", ":2: row is a number, not an object; each row must be a JSON object"),
        (
            "array.jsonl",
            ":1: looks like a JSON array, not JSON Lines; rename the file to .json or write one JSON object per line",
        ),
        ("empty.jsonl", ": no rows; the file is empty"),
    ],
)
def test_unreadable_inputs(name, message):
    with pytest.raises(DataError) as info:
        list(iter_rows(_bad(name)))
    assert str(info.value) == _bad(name) + message


def test_missing_file_and_unsupported_suffix(tmp_path):
    for missing in (
        str(tmp_path / "nope.jsonl"),
        "data/nope.parquet",
        "./nothing",
        str(tmp_path / "a" / "b"),
    ):
        with pytest.raises(DataError, match=r": no such file$"):
            list(iter_rows(missing))
    txt = tmp_path / "rows.txt"
    txt.write_text("hello\n")
    with pytest.raises(DataError, match=r"rows\.txt: unsupported file type '\.txt'"):
        list(iter_rows(str(txt)))


def test_hub_name_that_cannot_be_loaded():
    with pytest.raises(DataError) as info:
        list(iter_rows("some-org/surely-not-a-dataset"))
    msg = str(info.value)
    assert msg.startswith(
        "'some-org/surely-not-a-dataset' is not a local file or directory and could not be loaded"
    )
    assert msg.endswith("give a path to a .jsonl/.json/.parquet/.csv file or a save_to_disk directory")
    assert "\n" not in msg


def test_json_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert list(iter_rows(str(path))) == [(f"{path}:row 1", ROWS[0]), (f"{path}:row 2", ROWS[1])]


def test_json_object_with_one_list(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"version": 2, "data": ROWS}))
    assert [row for _, row in iter_rows(str(path))] == ROWS


def test_json_single_chat_row_is_one_row(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    )
    assert load(str(path), "sft").rows == [
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    ]


def test_jsonl_content_in_json_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "{broken\n")
    records = iter_rows(str(path))
    assert next(records) == (f"{path}:1", ROWS[0])
    assert next(records) == (f"{path}:2", ROWS[1])
    with pytest.raises(DataError, match=r"a\.json:3: not valid JSON"):
        next(records)


def test_json_errors(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"prompt": "x"},\n  {"prompt": \n')
    with pytest.raises(DataError, match=r"a\.json:4: not valid JSON \(Expecting value: column 1\)"):
        list(iter_rows(str(path)))
    path.write_bytes(b'[\n{"prompt": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"a\.json:2: not valid UTF-8 \(byte 0xe9 at column 16\)"):
        list(iter_rows(str(path)))
    path.write_text(json.dumps({"a": [1], "b": [2]}))
    with pytest.raises(DataError, match=r"a JSON object with 2 list values"):
        list(iter_rows(str(path)))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT_ROW, {**CHAT_ROW, "rejected": None}]), path)
    result = load(str(path), "preference", bad_rows="skip")
    assert result.rows == [CHAT_ROW]
    assert result.format == "preference_chat"
    assert result.skipped == [f"{path}:row 2: field 'rejected' is null; give it a value or drop the row"]


def test_parquet_unreadable(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError, match=r"a\.parquet: not a readable parquet file"):
        list(iter_rows(str(path)))


def test_csv_with_json_chat_column(tmp_path):
    path = tmp_path / "a.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow(
            [json.dumps(CHAT_ROW["prompt"]), json.dumps(CHAT_ROW["chosen"]), json.dumps(CHAT_ROW["rejected"])]
        )
        writer.writerow(["Multi\nline prompt", "Glad, great!", "No."])
        writer.writerow(["[INST] is not JSON", "Sure, happy to.", "Whatever."])
        writer.writerow(["too", "few"])
    records = iter_rows(str(path))
    assert [next(records)[0] for _ in range(3)] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    result = load(str(path), "preference", bad_rows="skip")
    assert result.format == "preference_chat"
    assert result.rows[0] == CHAT_ROW
    assert result.rows[1]["prompt"] == [{"role": "user", "content": "Multi\nline prompt"}]
    assert result.rows[2]["prompt"] == [{"role": "user", "content": "[INST] is not JSON"}]
    # the multi-line row occupies lines 3-4, so the short row starts on line 6
    assert result.skipped == [
        f"{path}:6: 2 cells but the header has 3 columns; quote cells that contain commas or line breaks"
    ]


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_rows(str(tmp_path / "ds"))) == [
        (f"{tmp_path / 'ds'}:row 1", ROWS[0]),
        (f"{tmp_path / 'ds'}:row 2", ROWS[1]),
    ]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load(str(tmp_path / "dd"), "preference", split="test").rows) == 1
    with pytest.raises(DataError) as info:
        list(iter_rows(str(tmp_path / "dd"), split="validation"))
    assert (
        str(info.value)
        == f"{tmp_path / 'dd'}: no split 'validation' (available splits: train, test); set the split to one of them"
    )


def test_plain_directory_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match=r"a directory, but not one written by datasets save_to_disk"):
        list(iter_rows(str(tmp_path)))
