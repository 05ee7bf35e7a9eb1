"""Special tokens and chat template: pad != eos in every tokenizer, and each model's ids synced to it.

Why pad != eos: with pad == eos, masks built as `ids != pad` drop every EOS, and HF's sequence
classifiers (which read the score at the last non-pad token) read it at the token before the EOS
instead of at the EOS. PPO's own response masks end at the first EOS either way
(`ppo_math.response_mask`), so they do not depend on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rlhf import templates
from rlhf.errors import ModelError

log = logging.getLogger(__name__)

PAD_CANDIDATE = templates.ENDOFTEXT
"""The first choice of pad token (SmolLM2's id 0)."""
ADDED_PAD = "<|pad|>"
"""The pad token added when the vocabulary has no other token that differs from eos."""


def template_text(tokenizer, chat_template: str | None) -> str | None:
    """The template to set: None keeps the tokenizer's own (ChatML if it has none).

    chat_template: None, "chatml", an inline Jinja template, or a path to a .jinja file.
    """
    if chat_template is None:
        return None if tokenizer.chat_template else templates.chatml()
    if chat_template == "chatml":
        return templates.chatml()
    if "{%" in chat_template or "{{" in chat_template:  # an inline Jinja template
        return chat_template
    file = Path(chat_template).expanduser()
    if not file.is_file():
        raise ModelError(f"model.chat_template: {chat_template}: no such file; use 'chatml', a path to a "
                         ".jinja file, or leave it unset")
    return file.read_text(encoding="utf-8")


def use_chatml_tokens(tokenizer) -> None:
    """ChatML ends turns with <|im_end|>: add the two tokens if missing and make <|im_end|> the EOS."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (templates.IM_START, templates.IM_END) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.eos_token != templates.IM_END:
        log.info("chat template is ChatML: eos token %r -> %r", tokenizer.eos_token, templates.IM_END)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # the old EOS is free now: a pad that needs no new row
        tokenizer.eos_token = templates.IM_END


def ensure_distinct_pad(tokenizer) -> None:
    """pad := `<|endoftext|>`, else unk, else a new `<|pad|>`; whichever first differs from eos."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    vocab = tokenizer.get_vocab()
    for candidate in (PAD_CANDIDATE, tokenizer.unk_token):
        if candidate is not None and candidate in vocab and vocab[candidate] != eos:
            tokenizer.pad_token = candidate
            return
    tokenizer.add_special_tokens({"pad_token": ADDED_PAD})  # loaders resize the embeddings to len(tokenizer)


def sync_special_ids(model, tokenizer) -> None:
    """Resize embeddings if the tokenizer grew; copy pad (and a missing eos) ids into the model configs."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    gen.pad_token_id = tokenizer.pad_token_id
    eos_ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos_ids = [i for i in eos_ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
        gen.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
