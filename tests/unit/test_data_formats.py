"""Format adapters: detection and normalization of every input format into the internal schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.data import FORMAT_KINDS, detect_format, load, normalize_row
from rlhf.errors import DataError

FORMATS_DIR = Path(__file__).resolve().parents[1] / "data" / "formats"


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


def S(text: str) -> dict:
    return {"role": "system", "content": text}


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"prompt": "q", "completion": "a"}, "prompt_completion"),
        ({"prompt": "q", "response": "a"}, "prompt_completion"),
        ({"prompt": [U("q")], "completion": [A("a")]}, "prompt_completion"),
        ({"messages": [U("q"), A("a")]}, "messages"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
        ({"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")]}, "preference_chat"),
        ({"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")]}, "preference_chat"),
        ({"chosen": "q a", "rejected": "q b"}, "preference_implicit"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "hh_rlhf"),
        ({"chosen": "Human: q\n\nAssistant: a", "rejected": "Human: q\n\nAssistant: b"}, "hh_rlhf"),
        ({"prompt": "q"}, "prompt_only"),
        ({"instruction": "q", "input": "", "output": "a"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
        # UltraFeedback-binarized: the sides repeat the prompt, and a `messages` column rides along.
        ({"prompt": "q", "chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")], "messages": [U("q"), A("a")]},
         "preference_conversation"),
        ({"conversations": [U("q")], "chosen": A("a"), "rejected": A("b")}, "preference_sharegpt"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_unknown_lists_accepted_keys():
    with pytest.raises(
        DataError, match=r"^f\.jsonl:3: unrecognized row keys \(text\); expected one of: prompt\+completion"
    ):
        detect_format({"text": "hello"}, "f.jsonl:3")


# (fixture file, kind) -> expected first normalized row
EXPECTED_FIRST = {
    ("prompt_completion", "sft"): {"prompt": [U("What is 2+2?")], "completion": [A("4.")]},
    ("response_alias", "sft"): {"prompt": [U("Say hi.")], "completion": [A("Hi!")]},
    ("messages", "sft"): {
        "prompt": [S("Be kind."), U("Hi"), A("Hello!"), U("How are you?")],
        "completion": [A("Great, thanks.")],
    },
    ("preference", "preference"): {
        "prompt": [U("Help me cook.")],
        "chosen": [A("Glad to help you cook!")],
        "rejected": [A("No.")],
    },
    ("preference_chat", "preference"): {
        "prompt": [S("Be kind."), U("Hi")],
        "chosen": [A("Hello, happy to help!")],
        "rejected": [A("Go away.")],
    },
    ("preference_chat_implicit", "preference"): {
        "prompt": [U("Hi"), A("Hello!"), U("Tips for chess?")],
        "chosen": [A("Control the center.")],
        "rejected": [A("No idea.")],
    },
    ("preference_implicit", "preference"): {
        "prompt": [U("Q: Is chess fun? A:")],
        "chosen": [A("Yes, it is great.")],
        "rejected": [A("No, it is bad.")],
    },
    ("hh_rlhf", "preference"): {
        "prompt": [
            U("How do I bake bread?"),
            A("Mix flour, water, yeast and salt, then knead."),
            U("How long should it rise?"),
        ],
        "chosen": [A("About an hour, until it doubles in size.")],
        "rejected": [A("Whatever, just wait.")],
    },
    ("prompt_only", "prompt"): {"prompt": [U("Tell me a joke.")]},
    ("ultrafeedback", "preference"): {
        "prompt": [U("How do I keep basil alive indoors?")],
        "chosen": [A("Give it six hours of sun and water when the top soil is dry.")],
        "rejected": [A("Basil is a plant.")],
        "margin": 3.5,
    },
    ("alpaca", "sft"): {"prompt": [U("Translate to French.\n\nGood morning")], "completion": [A("Bonjour")]},
    ("sharegpt", "sft"): {
        "prompt": [S("Be kind."), U("Hi"), A("Hello!"), U("How are you?")],
        "completion": [A("Great, thanks.")],
    },
    ("preference_sharegpt", "preference"): {
        "prompt": [U("Tips for chess?")],
        "chosen": [A("Control the center.")],
        "rejected": [A("No idea.")],
    },
}
DETECTED = {
    "response_alias": "prompt_completion",
    "preference_chat_implicit": "preference_chat",
    "ultrafeedback": "preference_conversation",
}


@pytest.mark.parametrize(("name", "kind"), sorted(EXPECTED_FIRST))
def test_every_fixture_format_normalizes(name, kind):
    result = load(str(FORMATS_DIR / f"{name}.jsonl"), kind)
    assert result.format == DETECTED.get(name, name)
    assert result.rows[0] == EXPECTED_FIRST[(name, kind)]
    assert result.n_read == len(result.rows)


def test_second_rows_chat_prompt_and_single_turn_hh():
    pc = load(str(FORMATS_DIR / "prompt_completion.jsonl"), "sft").rows[1]
    assert pc == {"prompt": [S("Be brief."), U("Capital of France?")], "completion": [A("Paris.")]}
    hh = load(str(FORMATS_DIR / "hh_rlhf.jsonl"), "preference").rows[1]
    assert hh == {
        "prompt": [U("Is chess hard?")],
        "chosen": [A("It is easy to learn and hard to master.")],
        "rejected": [A("No idea.")],
    }
    implicit = load(str(FORMATS_DIR / "preference_implicit.jsonl"), "preference").rows[1]
    assert implicit == {"prompt": [], "chosen": [A("Glad to help.")], "rejected": [A("No.")]}


@pytest.mark.parametrize(
    "name", ["preference", "preference_chat", "preference_chat_implicit", "hh_rlhf", "ultrafeedback"]
)
def test_preference_formats_serve_sft_and_prompt(name):
    pref = load(str(FORMATS_DIR / f"{name}.jsonl"), "preference").rows
    sft = load(str(FORMATS_DIR / f"{name}.jsonl"), "sft").rows
    prompts = load(str(FORMATS_DIR / f"{name}.jsonl"), "prompt").rows
    assert [r["completion"] for r in sft] == [r["chosen"] for r in pref]
    assert [r["prompt"] for r in prompts] == [r["prompt"] for r in pref]
    # the replies and scores are the layout's, not the row's own fields (ultrafeedback's prompt_id is)
    assert prompts[0].get("fields", {}) == ({"prompt_id": "3f1c"} if name == "ultrafeedback" else {})


def test_messages_and_prompt_completion_serve_prompt_kind():
    """A prompt row keeps the raw row's other fields (for a program reward) and where it was read."""
    path = str(FORMATS_DIR / "messages.jsonl")
    rows = load(path, "prompt").rows
    assert rows[1] == {"prompt": [U("Name a color.")], "fields": {"source": "extra keys are ignored"},
                       "where": f"{path}:2"}


@pytest.mark.parametrize("name", ["prompt_completion", "messages", "prompt_only"])
def test_wrong_kind_names_the_file_and_what_is_needed(name):
    path = str(FORMATS_DIR / f"{name}.jsonl")
    fmt = DETECTED.get(name, name)
    expected = (
        f"{path}: format '{fmt}' has no chosen/rejected pairs; the reward/dpo/orpo stages need "
        "preference data (prompt, chosen, rejected)"
    )
    with pytest.raises(DataError) as info:
        load(path, "preference", bad_rows="skip")
    assert str(info.value) == expected


def test_prompt_only_cannot_serve_sft():
    with pytest.raises(DataError, match="format 'prompt_only' has no responses; the sft stage needs"):
        load(str(FORMATS_DIR / "prompt_only.jsonl"), "sft")


def test_format_kinds_table():
    assert FORMAT_KINDS["prompt_only"] == ("prompt",)
    assert "preference" not in FORMAT_KINDS["messages"]
    assert FORMAT_KINDS["hh_rlhf"] == ("sft", "preference", "prompt")


def test_implicit_prefix_cut_back_to_whitespace():
    row = {"chosen": "Is it good? Yes", "rejected": "Is it good? Yesterday it was"}
    out = normalize_row(row, "preference_implicit", "preference", "f:1")
    assert out == {"prompt": [U("Is it good?")], "chosen": [A("Yes")], "rejected": [A("Yesterday it was")]}


def test_implicit_prefix_without_whitespace_gives_empty_prompt():
    out = normalize_row({"chosen": "Great", "rejected": "Grim"}, "preference_implicit", "preference", "f:1")
    assert out["prompt"] == []
    with pytest.raises(DataError, match=r"^f:1: the prompt is empty"):
        normalize_row({"chosen": "Great", "rejected": "Grim"}, "preference_implicit", "prompt", "f:1")


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        (
            {
                "chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more?",
                "rejected": "\n\nHuman: hi\n\nAssistant: b",
            },
            "hh_rlhf",
            "f:7: chosen does not end with an Assistant turn",
        ),
        (
            {"chosen": "Hi\n\nAssistant: a", "rejected": "Human: hi\n\nAssistant: b"},
            "hh_rlhf",
            "f:7: chosen does not start with 'Human:'",
        ),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant:  ", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
            "hh_rlhf",
            "f:7: chosen has an empty Assistant turn",
        ),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: a "},
            "hh_rlhf",
            "f:7: chosen and rejected are identical",
        ),
        (
            {"chosen": [U("q"), A("a"), U("again"), A("c")], "rejected": [U("q"), A("b")]},
            "preference_chat",
            "f:7: after the 1 shared messages, chosen has [assistant, user, assistant]",
        ),
        (
            {"chosen": [U("q"), U("a")], "rejected": [U("q"), A("b")]},
            "preference_chat",
            "f:7: after the 1 shared messages, chosen has [user]",
        ),
        (
            {"prompt": [U("q")], "chosen": [A("a"), A("b")], "rejected": [A("c")]},
            "preference_chat",
            "f:7: prompt and chosen disagree on the prompt turns (user 'q' vs assistant 'a')",
        ),
        (
            {"messages": [U("q"), A("a"), U("b")]},
            "messages",
            "f:7: the last message is 'user', not 'assistant'",
        ),
        ({"messages": [A("a")]}, "messages", "f:7: messages has no prompt before the assistant reply"),
        ({"messages": []}, "messages", "f:7: field 'messages' is an empty list"),
        ({"messages": [U("q"), {"role": "assistant"}]}, "messages", "f:7: messages[1] has no 'content'"),
        (
            {"messages": [U("q"), {"role": "assistant", "content": ["x"]}]},
            "messages",
            "f:7: messages[1].content is an array",
        ),
        ({"prompt": 3, "completion": "a"}, "prompt_completion", "f:7: field 'prompt' is a number"),
        ({"prompt": "q"}, "prompt_completion", "f:7: missing field 'completion'"),
        ({"prompt": "  ", "completion": "a"}, "prompt_completion", "f:7: field 'prompt' is empty"),
    ],
)
def test_row_errors_name_the_location(row, fmt, message):
    with pytest.raises(DataError) as info:
        normalize_row(row, fmt, "preference" if fmt in ("hh_rlhf", "preference_chat") else "sft", "f:7")
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_empty_system_message_is_allowed_and_extra_message_keys_dropped():
    row = {"messages": [S(""), {"role": "user", "content": "q", "name": "x"}, A("a")]}
    assert normalize_row(row, "messages", "sft", "f:1") == {"prompt": [S(""), U("q")], "completion": [A("a")]}


def test_preference_margin_is_kept_for_the_reward_loss(tmp_path):
    row = {"prompt": "Q?", "chosen": "good", "rejected": "bad", "margin": 0.75}
    out = normalize_row(row, detect_format(row), "preference", "f.jsonl:3")
    assert out["margin"] == 0.75
    assert "margin" not in normalize_row({k: v for k, v in row.items() if k != "margin"}, "preference",
                                         "preference", "f.jsonl:3")
    with pytest.raises(DataError, match=r"^f.jsonl:3: margin is a string '0.5', not a number$"):
        normalize_row({**row, "margin": "0.5"}, detect_format(row), "preference", "f.jsonl:3")


def test_reward_encoding_carries_the_margin_of_a_loaded_file(tmp_path, tiny_model_dir):
    from rlhf import models
    from rlhf.stages.reward import encode_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "Q?", "chosen": "good", "rejected": "bad", "margin": 0.5}\n'
                    '{"prompt": "R?", "chosen": "fine", "rejected": "poor"}\n')
    rows = load(str(path), "preference").rows
    tok = models.load_tokenizer(str(tiny_model_dir))
    assert [r["margin"] for r in encode_pairs(tok, rows, 64, str(path), use_margin=True)] == [0.5, 0.0]
    assert all("margin" not in r for r in encode_pairs(tok, rows, 64, str(path), use_margin=False))


def _write(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_ultrafeedback_system_turn_kept_and_equal_scores_give_margin_zero():
    second = load(str(FORMATS_DIR / "ultrafeedback.jsonl"), "preference").rows[1]
    # The prompt field is the bare user turn; the conversations add a system turn, which is kept.
    assert second == {
        "prompt": [S("Answer in one word."), U("Name a prime number.")],
        "chosen": [A("Seven.")],
        "rejected": [A("Nine.")],
        "margin": 0.0,
    }


def test_a_system_turn_only_the_prompt_carries_is_kept():
    row = {"prompt": [S("Be brief."), U("q")], "chosen": [U("q"), A("a")], "rejected": [A("b")]}
    out = normalize_row(row, detect_format(row), "preference", "f:1")
    assert out == {"prompt": [S("Be brief."), U("q")], "chosen": [A("a")], "rejected": [A("b")]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"chosen": [U("Something else?"), A("yes")]},
            "prompt and chosen disagree on the prompt turns (user 'How do I keep basil alive indoors?' vs "
            "user 'Something else?')",
        ),
        (
            {"rejected": [S("Be rude."), U("How do I keep basil alive indoors?"), A("no")],
             "chosen": [S("Be kind."), U("How do I keep basil alive indoors?"), A("yes")]},
            "chosen and rejected disagree on the prompt turns (system 'Be kind.' vs system 'Be rude.')",
        ),
        ({"chosen": [U("How do I keep basil alive indoors?")]}, "field 'chosen' ends with a user message"),
        ({"score_rejected": 9}, "score_chosen 8.5 is below score_rejected 9; chosen must be the preferred"),
        ({"score_rejected": None}, "field 'score_rejected' is null but 'score_chosen' is given"),
        ({"score_chosen": "8"}, "score_chosen is a string '8', not a number"),
    ],
)
def test_bad_ultrafeedback_rows_name_file_and_line(tmp_path, change, message):
    good = json.loads((FORMATS_DIR / "ultrafeedback.jsonl").read_text().splitlines()[0])
    path = _write(tmp_path / "uf.jsonl", [good, {**good, **change}])
    with pytest.raises(DataError) as info:
        load(path, "preference")
    assert str(info.value).startswith(f"{path}:2: {message}")


def test_ratings_also_give_the_margin():
    row = {"prompt": "q", "chosen": "a", "rejected": "b", "chosen_rating": 5, "rejected_rating": 2}
    assert normalize_row(row, "preference", "preference", "f:1")["margin"] == 3.0


def test_alpaca_system_and_history_become_earlier_turns():
    second = load(str(FORMATS_DIR / "alpaca.jsonl"), "sft").rows[1]
    assert second == {"prompt": [S("Be brief."), U("Hi"), A("Hello!"), U("Name a color.")],
                      "completion": [A("Blue.")]}
    prompts = load(str(FORMATS_DIR / "alpaca.jsonl"), "prompt").rows
    assert prompts[0] == {"prompt": [U("Translate to French.\n\nGood morning")]}


def test_sharegpt_top_level_system_and_openai_messages_with_system():
    second = load(str(FORMATS_DIR / "sharegpt.jsonl"), "sft").rows[1]
    assert second == {"prompt": [S("Be brief."), U("Name a color.")], "completion": [A("Blue.")]}
    row = {"messages": [S("You are terse."), U("2+2?"), A("4")]}
    assert normalize_row(row, detect_format(row), "sft", "f:1") == {
        "prompt": [S("You are terse."), U("2+2?")], "completion": [A("4")]}


@pytest.mark.parametrize(
    ("good", "bad", "message"),
    [
        ({"instruction": "q", "output": "a"}, {"instruction": "q"}, "missing field 'output'"),
        ({"instruction": "q", "output": "a"}, {"instruction": "q", "input": 3, "output": "a"},
         "field 'input' is a number, expected a string"),
        ({"instruction": "q", "output": "a"}, {"instruction": "q", "output": "a", "history": [["x"]]},
         "history[0] is an array, expected a [user, assistant] pair"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
         {"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "a"}]},
         "unknown role 'observation' in conversations[1]"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
         {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
         "conversations[1] has no 'value'; each message needs from and value"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
         {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
         "the last message is 'user', not 'assistant'"),
        ({"messages": [S("s"), U("q"), A("a")]}, {"messages": [S("s"), A("a")]},
         "messages has no prompt before the assistant reply"),
    ],
)
def test_bad_alpaca_sharegpt_and_messages_rows_name_file_and_line(tmp_path, good, bad, message):
    path = _write(tmp_path / "sft.jsonl", [good, bad])
    with pytest.raises(DataError) as info:
        load(path, "sft")
    assert str(info.value).startswith(f"{path}:2: {message}")
