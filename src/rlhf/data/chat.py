"""Field and chat-message checks shared by every format adapter.

A message comes out as `{"role", "content"}` with role system, user or assistant. It may come in as
`{"role", "content"}` (OpenAI, TRL) or as ShareGPT's `{"from", "value"}` with `human` and `gpt` for the
user and assistant roles. Every function raises `DataError("location: reason; what to do")`.
"""

from __future__ import annotations

from typing import Any

from rlhf.errors import DataError

ROLES = ("system", "user", "assistant")
# ShareGPT names; `user`/`assistant` are accepted there too.
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}

Message = dict[str, str]


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


def field(row: dict, key: str, location: str, fmt: str) -> Any:
    """Return `row[key]`, raising DataError when it is missing or null."""
    if key not in row:
        raise DataError(
            f"{location}: missing field '{key}'; every '{fmt}' row needs it (add it or drop the row)"
        )
    value = row[key]
    if value is None:
        raise DataError(f"{location}: field '{key}' is null; give it a value or drop the row")
    return value


def text(value: Any, name: str, location: str) -> str:
    """Check that `value` is a non-blank string and return it."""
    if not isinstance(value, str):
        raise DataError(f"{location}: field '{name}' is {json_type(value)}, expected a string")
    if not value.strip():
        raise DataError(f"{location}: field '{name}' is empty; give it text or drop the row")
    return value


def message(value: Any, name: str, location: str) -> Message:
    """Check one chat message (role/content or ShareGPT from/value) and return it as role and content."""
    if not isinstance(value, dict):
        raise DataError(
            f"{location}: {name} is {json_type(value)}, expected a message object {{role, content}}"
        )
    keys = ("from", "value") if "from" in value and "role" not in value else ("role", "content")
    for key in keys:
        if value.get(key) is None:
            raise DataError(f"{location}: {name} has no '{key}'; each message needs {keys[0]} and {keys[1]}")
    role, content = value[keys[0]], value[keys[1]]
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise DataError(
            f"{location}: unknown role {value[keys[0]]!r} in {name}; use one of {', '.join(ROLES)} "
            "(ShareGPT: system, human, gpt)"
        )
    if not isinstance(content, str):
        raise DataError(f"{location}: {name}.{keys[1]} is {json_type(content)}, expected a string")
    # An empty system prompt is common in real data and harmless; empty user/assistant turns are not.
    if role != "system" and not content.strip():
        raise DataError(f"{location}: {name}.{keys[1]} is empty; give it text or drop the row")
    return {"role": role, "content": content}


def messages(value: Any, name: str, location: str) -> list[Message]:
    """Check a non-empty list of chat messages and return it normalized."""
    if not isinstance(value, list):
        raise DataError(f"{location}: field '{name}' is {json_type(value)}, expected a list of messages")
    if not value:
        raise DataError(f"{location}: field '{name}' is an empty list; give it at least one message")
    return [message(m, f"{name}[{i}]", location) for i, m in enumerate(value)]


def prompt(value: Any, location: str, name: str = "prompt") -> list[Message]:
    """A prompt given as a string (one user message) or as a list of messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": text(value, name, location)}]
    if isinstance(value, list):
        return messages(value, name, location)
    raise DataError(
        f"{location}: field '{name}' is {json_type(value)}, expected a string or a list of messages"
    )


def system(row: dict, location: str) -> list[Message]:
    """The optional top-level `system` field of Alpaca and ShareGPT rows, as a leading system turn."""
    value = row.get("system")
    if value is None or value == "":
        return []
    if not isinstance(value, str):
        raise DataError(f"{location}: field 'system' is {json_type(value)}, expected a string")
    return [{"role": "system", "content": value}]


def same(a: Message, b: Message) -> bool:
    """Two messages say the same thing (role equal, content equal up to surrounding whitespace)."""
    return a["role"] == b["role"] and a["content"].strip() == b["content"].strip()


def ends_with(turns: list[Message], tail: list[Message]) -> bool:
    """True when `turns` ends with the messages of `tail`."""
    start = len(turns) - len(tail)
    return start >= 0 and all(same(a, b) for a, b in zip(turns[start:], tail, strict=True))


def brief(msg: Message, width: int = 40) -> str:
    """`role 'first words...'` of a message, for error messages."""
    content = msg["content"].strip().replace("\n", " ")
    cut = content if len(content) <= width else content[: width - 3] + "..."
    return f"{msg['role']} {cut!r}"
