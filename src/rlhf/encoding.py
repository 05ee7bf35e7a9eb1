"""One way to turn (prompt messages, response text) into token ids, shared by every stage.

prompt ids   = chat template of the prompt with the generation prompt appended
response ids = the response text tokenized alone, then EOS

This is exactly what a policy sees when it generates: the prompt rendered for generation, then the
sampled tokens, ending at EOS. SFT trains on it, the reward model is trained and scores on it (so its
score is read at the EOS token, as in PPO), and PPO re-tokenizes for a reward model whose tokenizer
differs from the policy's through it. No torch import here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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


def encode_batch(tokenizer, prompts: list[list[dict]], sides: list[list[str]],
                 max_length: int | None = None) -> list[list[tuple[list[int], int]] | None]:
    """`encode` of many rows at once: for row i, one (ids, prompt length) per side (`prompts[i]` followed by
    `side[i]`), or None when any of them is longer than `max_length`.

    Each prompt is rendered and tokenized once for all its sides, and each list of texts goes to the
    tokenizer in one batched call (the fast tokenizers' batch path), which is where the time goes on a large
    file; a side is tokenized only for the rows that still fit, so rows whose prompt alone is too long cost
    one prompt. The ids equal `encode`'s row by row: a batched `apply_chat_template` renders each
    conversation on its own, then tokenizes all of them as `prompt_ids` does one. (An empty prompt, which
    `encode` refuses as transformers does, gets the generation prompt alone here.)
    """
    if not prompts:
        return []
    rendered = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
                                             tokenizer_kwargs={"return_attention_mask": False})
    p_ids = [_ids(ids) for ids in _ids(rendered)]
    # a response is at least its EOS: a prompt of max_length tokens leaves no room for one
    seqs = [[] if max_length is None or len(ids) < max_length else None for ids in p_ids]
    for texts in sides:
        live = [i for i, seq in enumerate(seqs) if seq is not None]
        for i, r_ids in zip(live, _responses(tokenizer, [texts[i] for i in live]), strict=True):
            ids = p_ids[i] + r_ids
            if max_length is not None and len(ids) > max_length:
                seqs[i] = None
            else:
                seqs[i].append((ids, len(p_ids[i])))
    return seqs


def _responses(tokenizer, texts: list[str]) -> list[list[int]]:
    """`response_ids` of many texts, tokenized in one batched call."""
    if not texts:
        return []
    eos = tokenizer.eos_token_id
    rows = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    for ids in rows:
        if not ids or ids[-1] != eos:
            ids.append(eos)
    return rows


CHUNK_ROWS = 1000
"""Rows per batched tokenizer call in `encode_rows`, and per Arrow conversion in `encoded_dataset`: enough
for the tokenizer's batch path, few enough that one chunk's ids as Python lists take a few MB."""


def encode_rows(tokenizer, rows: list[dict], sides: tuple[str, ...],
                max_length: int | None = None) -> Iterator[list[tuple[list[int], int]] | None]:
    """`encode_batch` of internal-schema rows (`prompt`, and a response under each key of `sides`), row by
    row, `CHUNK_ROWS` rows per batched call: a caller that keeps only what it needs holds one chunk."""
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start:start + CHUNK_ROWS]
        yield from encode_batch(tokenizer, [row["prompt"] for row in chunk],
                                [[content(row[side]) for row in chunk] for side in sides], max_length)


def encoded_dataset(items: Iterable[dict | None], total: int, *, desc: str, progress: bool):
    """A `datasets.Dataset` of the items that are not None (one per row, e.g. from a stage's encoder over
    `encode_rows`), in order, under a progress bar over the `total` rows.

    Items become Arrow `CHUNK_ROWS` at a time: in a Python list a token id costs a pointer and, above 256,
    an int object of its own (about 40 bytes), in Arrow 8, and 200,000 pairs hold tens of millions of ids.
    """
    from datasets import Dataset, concatenate_datasets
    from tqdm.auto import tqdm

    parts, kept = [], []
    with tqdm(total=total, desc=desc, unit="row", disable=not progress) as bar:
        for item in items:
            if item is not None:
                kept.append(item)
            if len(kept) == CHUNK_ROWS:
                parts.append(Dataset.from_list(kept))
                kept = []
            bar.update()
    if kept or not parts:
        parts.append(Dataset.from_list(kept))
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def same_tokenizer(a, b) -> bool:
    """Whether token ids mean the same to both tokenizers (so no re-tokenizing is needed)."""
    return (a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id
            and a.chat_template == b.chat_template)
