"""One way to turn (prompt messages, response text) into token ids, shared by every stage.

prompt ids   = chat template of the prompt with the generation prompt appended
response ids = the response text tokenized alone, then EOS

This is exactly what a policy sees when it generates: the prompt rendered for generation, then the
sampled tokens, ending at EOS. SFT trains on it, the reward model is trained and scores on it (so its
score is read at the EOS token, as in PPO), and PPO re-tokenizes for a reward model whose tokenizer
differs from the policy's through it. No torch import here.
"""

from __future__ import annotations

from typing import Any


def _ids(out: Any) -> list[int]:
    # apply_chat_template returns a list in some versions and a BatchEncoding/dict in others.
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    """Token ids of a chat prompt, ending with the assistant generation prompt."""
    return _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))


def response_ids(tokenizer, text: str, *, add_eos: bool = True) -> list[int]:
    """Token ids of a response, with EOS appended unless the text already ends with it."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if add_eos and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def content(messages: list[dict] | str) -> str:
    """The text of a one-message response list (internal schema), or a plain string."""
    if isinstance(messages, str):
        return messages
    return "".join(m["content"] for m in messages)


def assistant_spans(tokenizer, prompt: list[dict], p_ids: list[int]) -> list[tuple[int, int]] | None:
    """`[start, end)` token spans of the assistant turns inside a rendered prompt `p_ids` (multi-turn SFT).

    A turn starts where the conversation before it, rendered with the generation prompt, ends, and ends
    where the conversation through it ends (its end-of-turn tokens included, so the model learns to stop).
    None when a template renders the start of a conversation differently on its own (some rewrite
    earlier assistant turns), so the spans cannot be placed.
    """
    spans = []
    for i, msg in enumerate(prompt):
        if msg["role"] != "assistant":
            continue
        try:
            start = prompt_ids(tokenizer, prompt[:i])
            end = _ids(tokenizer.apply_chat_template(prompt[: i + 1], tokenize=True))
        except Exception:  # jinja templates raise their own errors, e.g. on a conversation opening with a reply
            return None
        if len(end) <= len(start) or p_ids[: len(start)] != start or p_ids[: len(end)] != end:
            return None
        spans.append((len(start), len(end)))
    return spans


def encode(tokenizer, prompt: list[dict], response: str, max_length: int | None = None,
           max_prompt_length: int | None = None) -> tuple[list[int], int] | None:
    """(ids, prompt length) of prompt + response, or None when it does not fit in `max_length`.

    Over-long prompts keep their end (the turn being answered) when `max_prompt_length` is given.
    Over-long responses are not cut: a reward read at a truncated position would be meaningless.
    """
    p_ids = prompt_ids(tokenizer, prompt)
    if max_prompt_length is not None and len(p_ids) > max_prompt_length:
        p_ids = p_ids[-max_prompt_length:]
    r_ids = response_ids(tokenizer, response)
    ids = p_ids + r_ids
    if max_length is not None and len(ids) > max_length:
        return None
    return ids, len(p_ids)


def same_tokenizer(a, b) -> bool:
    """Whether token ids mean the same to both tokenizers (so no re-tokenizing is needed)."""
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
            and a.chat_template == b.chat_template)
