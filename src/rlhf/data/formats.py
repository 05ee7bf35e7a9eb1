"""Format adapters: detect a row's input format and normalize it to the internal schema.

The internal schema is TRL's conversational format. A message is `{"role", "content"}`:
- kind "sft":        `{"prompt": [msg, ...], "completion": [assistant_msg]}`
- kind "preference": `{"prompt": [msg, ...], "chosen": [assistant_msg], "rejected": [assistant_msg]}`
- kind "prompt":     `{"prompt": [msg, ...]}`

Every function here is pure and raises `DataError("location: reason; what to do")` on a bad row.
"""

from __future__ import annotations

import os
import re
from typing import Any

from rlhf.errors import DataError

KINDS = ("sft", "preference", "prompt")
ROLES = ("system", "user", "assistant")
PREFERENCE_FORMATS = ("preference", "preference_chat", "preference_implicit", "hh_rlhf")
FORMATS = ("prompt_completion", "messages", *PREFERENCE_FORMATS, "prompt_only")

# Which kinds each format can serve: preference data also serves SFT (prompt + chosen) and PPO prompts.
FORMAT_KINDS: dict[str, tuple[str, ...]] = {
    "prompt_completion": ("sft", "prompt"),
    "messages": ("sft", "prompt"),
    **{fmt: KINDS for fmt in PREFERENCE_FORMATS},
    "prompt_only": ("prompt",),
}

ACCEPTED_KEYS = (
    "prompt+completion (or prompt+response), messages, prompt+chosen+rejected, "
    "chosen+rejected (chat, plain text or Anthropic HH transcripts), prompt"
)

Message = dict[str, str]
# Anthropic HH turn markers; the real transcripts start with "\n\nHuman:".
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def json_type(value: Any) -> str:
    """The JSON name of a value's type with its article, for error messages ("a number", "an array")."""
    if value is None:
        return "null"
    names = (
        (bool, "a boolean"),
        ((int, float), "a number"),
        (str, "a string"),
        (list, "an array"),
        (dict, "an object"),
    )
    return next((name for types, name in names if isinstance(value, types)), f"a {type(value).__name__}")


def source_of(location: str) -> str:
    """The file (or dataset) part of a location such as `data.jsonl:12` or `data.parquet:row 3`."""
    head, sep, tail = location.rpartition(":")
    if sep and (tail.isdigit() or tail.startswith("row ")):
        return head
    return location


def _is_hh(text: str) -> bool:
    """True when a plain string looks like an Anthropic HH transcript."""
    return text.lstrip().startswith("Human:") or "\n\nHuman:" in text


def detect_format(row: dict, location: str = "") -> str:
    """Name the input format of one raw row from its keys and value types.

    Raises DataError when the keys match no known format, listing the accepted key sets.
    """
    where = f"{location}: " if location else ""
    if not isinstance(row, dict):
        raise DataError(f"{where}row is {json_type(row)}, not an object; each row must be a JSON object")
    if "messages" in row:
        return "messages"
    if "chosen" in row and "rejected" in row:
        chosen = row["chosen"]
        if isinstance(chosen, list):
            return "preference_chat"
        if "prompt" in row:
            return "preference"
        if isinstance(chosen, str) and _is_hh(chosen):
            return "hh_rlhf"
        return "preference_implicit"
    if "prompt" in row and ("completion" in row or "response" in row):
        return "prompt_completion"
    if "prompt" in row:
        return "prompt_only"
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise DataError(f"{where}unrecognized row keys ({keys}); expected one of: {ACCEPTED_KEYS}")


def check_kind(fmt: str, kind: str, source: str) -> None:
    """Raise DataError when a file of format `fmt` cannot serve a stage that needs `kind` rows."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind in FORMAT_KINDS[fmt]:
        return
    if kind == "preference":
        raise DataError(
            f"{source}: format '{fmt}' has no chosen/rejected pairs; the reward/dpo/orpo stages need "
            "preference data (prompt, chosen, rejected)"
        )
    raise DataError(
        f"{source}: format '{fmt}' has no responses; the sft stage needs prompt+completion, messages, "
        "or preference data (prompt, chosen, rejected)"
    )


def _field(row: dict, key: str, location: str, fmt: str) -> Any:
    """Return `row[key]`, raising DataError when it is missing or null."""
    if key not in row:
        raise DataError(
            f"{location}: missing field '{key}'; every '{fmt}' row needs it (add it or drop the row)"
        )
    value = row[key]
    if value is None:
        raise DataError(f"{location}: field '{key}' is null; give it a value or drop the row")
    return value


def _text(value: Any, name: str, location: str) -> str:
    """Check that `value` is a non-blank string and return it."""
    if not isinstance(value, str):
        raise DataError(f"{location}: field '{name}' is {json_type(value)}, expected a string")
    if not value.strip():
        raise DataError(f"{location}: field '{name}' is empty; give it text or drop the row")
    return value


def _message(value: Any, name: str, location: str) -> Message:
    """Check one chat message and return it reduced to role and content."""
    if not isinstance(value, dict):
        raise DataError(
            f"{location}: {name} is {json_type(value)}, expected a message object {{role, content}}"
        )
    for key in ("role", "content"):
        if value.get(key) is None:
            raise DataError(f"{location}: {name} has no '{key}'; each message needs role and content")
    role, content = value["role"], value["content"]
    if role not in ROLES:
        raise DataError(f"{location}: unknown role {role!r} in {name}; use one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise DataError(f"{location}: {name}.content is {json_type(content)}, expected a string")
    # An empty system prompt is common in real data and harmless; empty user/assistant turns are not.
    if role != "system" and not content.strip():
        raise DataError(f"{location}: {name}.content is empty; give it text or drop the row")
    return {"role": role, "content": content}


def _messages(value: Any, name: str, location: str) -> list[Message]:
    """Check a non-empty list of chat messages and return it normalized."""
    if not isinstance(value, list):
        raise DataError(f"{location}: field '{name}' is {json_type(value)}, expected a list of messages")
    if not value:
        raise DataError(f"{location}: field '{name}' is an empty list; give it at least one message")
    return [_message(m, f"{name}[{i}]", location) for i, m in enumerate(value)]


def _prompt(value: Any, location: str) -> list[Message]:
    """A prompt given as a string (one user message) or as a list of messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, "prompt", location)}]
    if isinstance(value, list):
        return _messages(value, "prompt", location)
    raise DataError(
        f"{location}: field 'prompt' is {json_type(value)}, expected a string or a list of messages"
    )


def _response(value: Any, name: str, location: str) -> Message:
    """A response given as a string or as a list holding exactly one assistant message."""
    if isinstance(value, str):
        return {"role": "assistant", "content": _text(value, name, location)}
    if not isinstance(value, list):
        raise DataError(
            f"{location}: field '{name}' is {json_type(value)}, expected a string or a list of messages"
        )
    msgs = _messages(value, name, location)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in msgs)
        raise DataError(f"{location}: field '{name}' must be exactly one assistant message, got [{roles}]")
    return msgs[0]


def _split_shared(chosen: list[Message], rejected: list[Message], location: str) -> tuple:
    """Split two full conversations into (shared prefix, chosen reply, rejected reply).

    After the longest shared message prefix each side must be exactly one assistant message.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise DataError(
            f"{location}: chosen and rejected are identical; a preference pair needs two different responses"
        )
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        rest = side[n:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            roles = ", ".join(m["role"] for m in rest) or "nothing"
            raise DataError(
                f"{location}: after the {n} shared messages, {name} has [{roles}]; each side must end in "
                "exactly one assistant message that differs from the other side"
            )
    return chosen[:n], chosen[n], rejected[n]


def _hh_turns(text: Any, name: str, location: str) -> list[Message]:
    """Parse an Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    text = _text(text, name, location)
    parts = _HH_TURN.split("\n\n" + text.strip())
    if parts[0].strip():
        raise DataError(
            f"{location}: {name} does not start with 'Human:'; HH transcripts alternate Human:/Assistant: turns"
        )
    turns = []
    for marker, content in zip(parts[1::2], parts[2::2], strict=True):
        if not content.strip():
            raise DataError(f"{location}: {name} has an empty {marker} turn; drop the row")
        turns.append({"role": _HH_ROLES[marker], "content": content.strip()})
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{location}: {name} does not end with an Assistant turn; drop the row")
    return turns


def _implicit_split(chosen: str, rejected: str, location: str) -> tuple:
    """Split two plain strings at their longest common prefix, cut back to a whitespace boundary."""
    chosen, rejected = chosen.strip(), rejected.strip()
    if chosen == rejected:
        raise DataError(
            f"{location}: chosen and rejected are identical; a preference pair needs two different responses"
        )
    common = os.path.commonprefix([chosen, rejected])
    cut = next((i + 1 for i in range(len(common) - 1, -1, -1) if common[i].isspace()), 0)
    prompt = common[:cut].strip()
    chosen_reply, rejected_reply = chosen[cut:].strip(), rejected[cut:].strip()
    for name, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
        if not reply:
            raise DataError(
                f"{location}: {name} has no text after the shared prefix; drop the row or add a prompt field"
            )
    prompt_msgs = [{"role": "user", "content": prompt}] if prompt else []
    return (
        prompt_msgs,
        {"role": "assistant", "content": chosen_reply},
        {"role": "assistant", "content": rejected_reply},
    )


def parse_preference(row: dict, fmt: str, location: str) -> tuple[list[Message], Message, Message]:
    """Return (prompt, chosen, rejected) for a row of one of the preference formats."""
    chosen, rejected = _field(row, "chosen", location, fmt), _field(row, "rejected", location, fmt)
    if fmt == "hh_rlhf":
        return _split_shared(
            _hh_turns(chosen, "chosen", location), _hh_turns(rejected, "rejected", location), location
        )
    if fmt == "preference_implicit":
        return _implicit_split(
            _text(chosen, "chosen", location), _text(rejected, "rejected", location), location
        )
    if fmt == "preference_chat" and "prompt" not in row:
        return _split_shared(
            _messages(chosen, "chosen", location), _messages(rejected, "rejected", location), location
        )
    prompt = _prompt(_field(row, "prompt", location, fmt), location)
    pair = _response(chosen, "chosen", location), _response(rejected, "rejected", location)
    if pair[0]["content"].strip() == pair[1]["content"].strip():
        raise DataError(
            f"{location}: chosen and rejected are identical; a preference pair needs two different responses"
        )
    return prompt, pair[0], pair[1]


def _parse_sft(row: dict, fmt: str, location: str) -> tuple[list[Message], Message]:
    """Return (prompt, completion) for a prompt_completion or messages row."""
    if fmt == "messages":
        msgs = _messages(_field(row, "messages", location, fmt), "messages", location)
        if msgs[-1]["role"] != "assistant":
            raise DataError(
                f"{location}: the last message is {msgs[-1]['role']!r}, not 'assistant'; end each conversation with the reply to learn"
            )
        if len(msgs) < 2:
            raise DataError(
                f"{location}: messages has no prompt before the assistant reply; add the user turn"
            )
        return msgs[:-1], msgs[-1]
    key = "completion" if "completion" in row or "response" not in row else "response"
    prompt = _prompt(_field(row, "prompt", location, fmt), location)
    return prompt, _response(_field(row, key, location, fmt), key, location)


def normalize_row(row: dict, fmt: str, kind: str, location: str) -> dict:
    """Convert one raw row of format `fmt` into the internal schema for `kind`.

    Raises DataError (`location: reason`) for a bad row, or (`file: reason`) when the format cannot
    serve the kind at all.
    """
    if fmt not in FORMAT_KINDS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    check_kind(fmt, kind, source_of(location))
    if not isinstance(row, dict):
        raise DataError(f"{location}: row is {json_type(row)}, not an object; each row must be a JSON object")
    if fmt == "prompt_only":
        return {"prompt": _prompt(_field(row, "prompt", location, fmt), location)}
    if fmt in PREFERENCE_FORMATS:
        prompt, chosen, rejected = parse_preference(row, fmt, location)
        if kind == "preference":
            out = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
            if "margin" in row:  # a per-pair margin for the reward loss (`reward.margin`)
                margin = row["margin"]
                if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
                    raise DataError(f"{location}: margin is {json_type(margin)} {margin!r}, not a number")
                out["margin"] = float(margin)
            return out
        completion = chosen
    else:
        prompt, completion = _parse_sft(row, fmt, location)
    if kind == "prompt":
        if not prompt:
            raise DataError(
                f"{location}: the prompt is empty (no shared prefix); PPO needs a prompt for every row"
            )
        return {"prompt": prompt}
    return {"prompt": prompt, "completion": [completion]}
