"""Format adapters: detect a row's input format and normalize it to the internal schema.

The internal schema is TRL's conversational format. A message is `{"role", "content"}`:
- kind "sft":        `{"prompt": [msg, ...], "completion": [assistant_msg]}`
- kind "preference": `{"prompt": [msg, ...], "chosen": [assistant_msg], "rejected": [assistant_msg]}`,
                     plus `"margin": float` when the row gives one (or two scores)
- kind "prompt":     `{"prompt": [msg, ...]}`, plus `fields` (the raw row's other keys) and `where`
                      (`file:line`) when the raw row has keys besides the prompt

A multi-turn SFT row keeps its earlier assistant turns in `prompt`, with their roles; the SFT stage
trains on every assistant turn. Every function here is pure and raises
`DataError("location: reason; what to do")` on a bad row.
"""

from __future__ import annotations

import os
import re
from typing import Any

from rlhf.data.chat import (
    Message,
    brief,
    ends_with,
    field,
    json_type,
    message,
    messages,
    prompt,
    same,
    system,
    text,
)
from rlhf.errors import DataError

KINDS = ("sft", "preference", "prompt")
SFT_FORMATS = ("prompt_completion", "messages", "sharegpt", "alpaca")
PREFERENCE_FORMATS = (
    "preference",
    "preference_chat",
    "preference_conversation",
    "preference_sharegpt",
    "preference_implicit",
    "hh_rlhf",
)
FORMATS = (*SFT_FORMATS, *PREFERENCE_FORMATS, "prompt_only")

# Which kinds each format can serve: preference data also serves SFT (prompt + chosen) and PPO prompts.
FORMAT_KINDS: dict[str, tuple[str, ...]] = {
    **{fmt: ("sft", "prompt") for fmt in SFT_FORMATS},
    **{fmt: KINDS for fmt in PREFERENCE_FORMATS},
    "prompt_only": ("prompt",),
}

# How each format's fields become the internal schema; `rlhf data inspect` prints it.
LAYOUTS = {
    "prompt_completion": "prompt -> prompt (a string is one user turn); completion (or response) -> reply",
    "messages": "messages (role/content) -> turns; the last assistant message -> reply; "
    "SFT trains every assistant turn",
    "sharegpt": "system + conversations (from/value; human -> user, gpt -> assistant) -> turns; "
    "the last gpt turn -> reply; SFT trains every assistant turn",
    "alpaca": "system, history pairs, then instruction + blank line + input -> user turn; output -> reply",
    "preference": "prompt -> prompt; chosen, rejected -> replies",
    "preference_chat": "the turns chosen and rejected share (after the prompt, if given) -> prompt; "
    "their last assistant messages -> replies",
    "preference_conversation": "chosen/rejected whole conversations that repeat the prompt: repeated turns "
    "stripped (checked against prompt; system turns kept) -> prompt; last assistant messages -> replies",
    "preference_sharegpt": "system + conversations (from/value) -> prompt; chosen, rejected messages -> replies",
    "preference_implicit": "common prefix of chosen and rejected (cut at whitespace) -> prompt; the rest -> replies",
    "hh_rlhf": "Human:/Assistant: transcripts -> turns; shared turns -> prompt; last Assistant turns -> replies",
    "prompt_only": "prompt -> prompt",
}
# (chosen, rejected) score fields; their difference becomes the pair's margin.
SCORE_KEYS = (
    ("score_chosen", "score_rejected"),
    ("chosen_score", "rejected_score"),
    ("chosen_rating", "rejected_rating"),
)
# Every top-level key a format reads: the names `data.columns` may map a file's own keys onto.
ROW_KEYS = (
    "prompt",
    "completion",
    "response",
    "messages",
    "conversations",
    "system",
    "instruction",
    "input",
    "output",
    "history",
    "chosen",
    "rejected",
    "margin",
    *(k for pair in SCORE_KEYS for k in pair),
)

ACCEPTED_KEYS = (
    "prompt+completion (or prompt+response), messages, conversations (ShareGPT), instruction+output (Alpaca), "
    "prompt+chosen+rejected, chosen+rejected (chat, plain text or Anthropic HH transcripts), prompt"
)

# Anthropic HH turn markers; the real transcripts start with "\n\nHuman:".
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_IDENTICAL = "chosen and rejected are identical; a preference pair needs two different responses"


def source_of(location: str) -> str:
    """The file (or dataset) part of a location such as `data.jsonl:12` or `data.parquet:row 3`."""
    head, sep, tail = location.rpartition(":")
    if sep and (tail.isdigit() or tail.startswith("row ")):
        return head
    return location


def _is_hh(value: str) -> bool:
    """True when a plain string looks like an Anthropic HH transcript."""
    return value.lstrip().startswith("Human:") or "\n\nHuman:" in value


def _is_conversation(value: Any) -> bool:
    """A message list that holds more than the reply (it repeats prompt turns)."""
    if not isinstance(value, list) or not value:
        return False
    first = value[0]
    return len(value) > 1 or not (
        isinstance(first, dict) and first.get("role", first.get("from")) in ("assistant", "gpt")
    )


def _preference_format(row: dict) -> str:
    """Which preference format a row with chosen and rejected is in."""
    chosen = row["chosen"]
    if isinstance(chosen, dict) and "conversations" in row:
        return "preference_sharegpt"
    if isinstance(chosen, list):
        return (
            "preference_conversation" if "prompt" in row and _is_conversation(chosen) else "preference_chat"
        )
    if "prompt" in row:
        return "preference"
    if isinstance(chosen, str) and _is_hh(chosen):
        return "hh_rlhf"
    return "preference_implicit"


def detect_format(row: dict, location: str = "") -> str:
    """Name the input format of one raw row from its keys and value types.

    Pairs are checked first: UltraFeedback rows also carry `messages` (the chosen conversation).
    Raises DataError when the keys match no known format, listing the accepted key sets.
    """
    where = f"{location}: " if location else ""
    if not isinstance(row, dict):
        raise DataError(f"{where}row is {json_type(row)}, not an object; each row must be a JSON object")
    if "chosen" in row and "rejected" in row:
        return _preference_format(row)
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "messages"
    if "instruction" in row:
        return "alpaca"
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


def _split_shared(chosen: list[Message], rejected: list[Message], location: str) -> tuple:
    """Split two full conversations into (shared prefix, chosen reply, rejected reply).

    After the longest shared message prefix each side must be exactly one assistant message.
    """
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        raise DataError(f"{location}: {_IDENTICAL}")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        rest = side[n:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            roles = ", ".join(m["role"] for m in rest) or "nothing"
            raise DataError(
                f"{location}: after the {n} shared messages, {name} has [{roles}]; each side must end in "
                "exactly one assistant message that differs from the other side"
            )
    return chosen[:n], chosen[n], rejected[n]


def _hh_turns(value: Any, name: str, location: str) -> list[Message]:
    """Parse an Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    value = text(value, name, location)
    parts = _HH_TURN.split("\n\n" + value.strip())
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
        raise DataError(f"{location}: {_IDENTICAL}")
    common = os.path.commonprefix([chosen, rejected])
    cut = next((i + 1 for i in range(len(common) - 1, -1, -1) if common[i].isspace()), 0)
    shared = common[:cut].strip()
    chosen_reply, rejected_reply = chosen[cut:].strip(), rejected[cut:].strip()
    for name, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
        if not reply:
            raise DataError(
                f"{location}: {name} has no text after the shared prefix; drop the row or add a prompt field"
            )
    prompt_msgs = [{"role": "user", "content": shared}] if shared else []
    return (
        prompt_msgs,
        {"role": "assistant", "content": chosen_reply},
        {"role": "assistant", "content": rejected_reply},
    )


def _reply(value: Any, name: str, location: str) -> tuple[list[Message], Message]:
    """One side of a pair as (the turns it repeats before its reply, the reply).

    A side is a string, one message object, or a message list ending in the assistant reply.
    """
    if isinstance(value, str):
        return [], {"role": "assistant", "content": text(value, name, location)}
    if isinstance(value, dict):
        msgs = [message(value, name, location)]
    elif isinstance(value, list):
        msgs = messages(value, name, location)
    else:
        raise DataError(
            f"{location}: field '{name}' is {json_type(value)}, expected a string or a list of messages"
        )
    if msgs[-1]["role"] != "assistant":
        raise DataError(
            f"{location}: field '{name}' ends with a {msgs[-1]['role']} message; it must end with the "
            "assistant reply"
        )
    return msgs[:-1], msgs[-1]


def _reconcile(given: list[Message], heads: dict[str, list[Message]], location: str) -> list[Message]:
    """The prompt of a pair whose sides may repeat its turns before their replies (UltraFeedback does).

    The longest of the given prompt and the repeated turns wins, so a system turn that only the
    conversations carry (or only the prompt) is kept; each of the others must be how it ends.
    """
    sides = {"prompt": given, **heads}
    longest_name = max(sides, key=lambda name: len(sides[name]))
    longest = sides[longest_name]
    for name, turns in sides.items():
        if ends_with(longest, turns):
            continue
        k = next(k for k in range(1, len(turns) + 1) if not same(turns[-k], longest[-k]))
        (a, a_msg), (b, b_msg) = sorted(
            ((name, turns[-k]), (longest_name, longest[-k])), key=lambda p: list(sides).index(p[0])
        )
        raise DataError(
            f"{location}: {a} and {b} disagree on the prompt turns ({brief(a_msg)} vs {brief(b_msg)}); "
            "chosen and rejected must repeat the prompt's turns or hold only the reply"
        )
    return longest


def _pair(given: list[Message], chosen: Any, rejected: Any, location: str) -> tuple:
    """(prompt, chosen reply, rejected reply) of a pair with a prompt; the sides may repeat its turns."""
    chosen_head, chosen_reply = _reply(chosen, "chosen", location)
    rejected_head, rejected_reply = _reply(rejected, "rejected", location)
    full = _reconcile(given, {"chosen": chosen_head, "rejected": rejected_head}, location)
    if chosen_reply["content"].strip() == rejected_reply["content"].strip():
        raise DataError(f"{location}: {_IDENTICAL}")
    return full, chosen_reply, rejected_reply


def parse_preference(row: dict, fmt: str, location: str) -> tuple[list[Message], Message, Message]:
    """Return (prompt, chosen, rejected) for a row of one of the preference formats."""
    chosen, rejected = field(row, "chosen", location, fmt), field(row, "rejected", location, fmt)
    if fmt == "hh_rlhf":
        return _split_shared(
            _hh_turns(chosen, "chosen", location), _hh_turns(rejected, "rejected", location), location
        )
    if fmt == "preference_implicit":
        return _implicit_split(
            text(chosen, "chosen", location), text(rejected, "rejected", location), location
        )
    if fmt == "preference_sharegpt":
        turns = system(row, location) + messages(
            field(row, "conversations", location, fmt), "conversations", location
        )
        return _pair(turns, chosen, rejected, location)
    if fmt == "preference_chat" and "prompt" not in row:
        return _split_shared(
            messages(chosen, "chosen", location), messages(rejected, "rejected", location), location
        )
    return _pair(prompt(field(row, "prompt", location, fmt), location), chosen, rejected, location)


def _number(row: dict, key: str, other: str, location: str) -> float:
    """A finite number field that comes with `other` (a score pair, or the margin)."""
    if row.get(key) is None:
        state = "missing" if key not in row else "null"
        raise DataError(f"{location}: field '{key}' is {state} but '{other}' is given; give both or neither")
    value = row[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value != value
        or abs(value) == float("inf")
    ):
        raise DataError(f"{location}: {key} is {json_type(value)} {value!r}, not a number")
    return float(value)


def margin(row: dict, location: str) -> float | None:
    """The pair's margin for the reward loss: `margin`, else chosen score - rejected score, else None.

    A pair whose chosen side scores below its rejected side is mislabelled, and an error.
    """
    if "margin" in row:
        return _number(row, "margin", "margin", location)
    for chosen_key, rejected_key in SCORE_KEYS:
        if chosen_key in row or rejected_key in row:
            chosen = _number(row, chosen_key, rejected_key, location)
            rejected = _number(row, rejected_key, chosen_key, location)
            if chosen < rejected:
                raise DataError(
                    f"{location}: {chosen_key} {chosen:g} is below {rejected_key} {rejected:g}; chosen must be "
                    "the preferred response (swap the sides or drop the row)"
                )
            return chosen - rejected
    return None


def _conversation(row: dict, fmt: str, location: str) -> list[Message]:
    """The turns of a messages or ShareGPT row (with ShareGPT's top-level system prompt)."""
    key = "messages" if fmt == "messages" else "conversations"
    turns = messages(field(row, key, location, fmt), key, location)
    return turns if fmt == "messages" else system(row, location) + turns


def _history(value: Any, location: str) -> list[Message]:
    """Alpaca `history`: earlier [instruction, response] pairs, as user and assistant turns."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(
            f"{location}: field 'history' is {json_type(value)}, expected a list of [user, assistant] pairs"
        )
    turns = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise DataError(
                f"{location}: history[{i}] is {json_type(pair)}, expected a [user, assistant] pair"
            )
        turns.append({"role": "user", "content": text(pair[0], f"history[{i}][0]", location)})
        turns.append({"role": "assistant", "content": text(pair[1], f"history[{i}][1]", location)})
    return turns


def _alpaca_prompt(row: dict, location: str) -> list[Message]:
    """Alpaca's system, history and instruction (+ input after a blank line) as turns."""
    user = text(field(row, "instruction", location, "alpaca"), "instruction", location)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{location}: field 'input' is {json_type(extra)}, expected a string")
    if extra and extra.strip():
        user = f"{user}\n\n{extra}"
    return (
        system(row, location) + _history(row.get("history"), location) + [{"role": "user", "content": user}]
    )


def _parse_sft(row: dict, fmt: str, location: str) -> tuple[list[Message], Message]:
    """Return (prompt turns, last assistant reply) for a row of an SFT format."""
    if fmt == "alpaca":
        reply = text(field(row, "output", location, fmt), "output", location)
        return _alpaca_prompt(row, location), {"role": "assistant", "content": reply}
    if fmt in ("messages", "sharegpt"):
        msgs = _conversation(row, fmt, location)
        if msgs[-1]["role"] != "assistant":
            raise DataError(
                f"{location}: the last message is {msgs[-1]['role']!r}, not 'assistant'; end each conversation "
                "with the reply to learn"
            )
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise DataError(f"{location}: {fmt} has no prompt before the assistant reply; add the user turn")
        return msgs[:-1], msgs[-1]
    key = "completion" if "completion" in row or "response" not in row else "response"
    head, reply = _reply(field(row, key, location, fmt), key, location)
    if head:
        raise DataError(
            f"{location}: field '{key}' must be exactly one assistant message, got "
            f"[{', '.join(m['role'] for m in head + [reply])}]"
        )
    return prompt(field(row, "prompt", location, fmt), location), reply


# The keys some layout reads a conversation or a score from: not a row's own fields.
LAYOUT_KEYS = frozenset({"prompt", "messages", "conversations", "history", "instruction", "input", "output",
                         "completion", "response", "chosen", "rejected", "margin", "score_chosen", "score_rejected"})


def _prompt_row(turns: list[dict], raw: dict, location: str) -> dict:
    """A prompt row; with the raw row's other fields (an `answer` for a program reward to check) under
    `fields`, and where it was read under `where`, when the raw row has any besides its layout's keys."""
    fields = {key: value for key, value in raw.items() if key not in LAYOUT_KEYS}
    return {"prompt": turns, "fields": fields, "where": location} if fields else {"prompt": turns}


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
    if fmt == "prompt_only" or (fmt == "alpaca" and kind == "prompt"):
        turns = (
            _alpaca_prompt(row, location)
            if fmt == "alpaca"
            else prompt(field(row, "prompt", location, fmt), location)
        )
        return _prompt_row(turns, row, location)
    if fmt in PREFERENCE_FORMATS:
        turns, chosen, rejected = parse_preference(row, fmt, location)
        if kind == "preference":
            out = {"prompt": turns, "chosen": [chosen], "rejected": [rejected]}
            pair_margin = margin(row, location)
            if pair_margin is not None:  # for the reward loss (`reward.margin`)
                out["margin"] = pair_margin
            return out
        completion = chosen
    else:
        turns, completion = _parse_sft(row, fmt, location)
    if kind == "prompt":
        if not turns:
            raise DataError(
                f"{location}: the prompt is empty (no shared prefix); PPO needs a prompt for every row"
            )
        return _prompt_row(turns, row, location)
    return {"prompt": turns, "completion": [completion]}


def describe(row: dict, fmt: str) -> list[str]:
    """How rows of format `fmt` are read, with the optional fields this (raw) row uses."""
    lines = [LAYOUTS[fmt]]
    if fmt in PREFERENCE_FORMATS:
        if "margin" in row:
            lines.append("margin -> pair margin (reward.margin)")
        else:
            lines += [
                f"{c} - {r} -> pair margin (reward.margin)" for c, r in SCORE_KEYS if c in row or r in row
            ]
    return lines
