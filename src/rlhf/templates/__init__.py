"""The chat templates shipped with the package, and the special tokens of ChatML.

Nothing from `rlhf` is imported here, so the loaders (`rlhf.models`) and the fixture builder
(`rlhf.tiny`) both take the template from this module instead of from each other.
"""

from __future__ import annotations

from pathlib import Path

CHATML_PATH = Path(__file__).with_name("chatml.jinja")
"""Training-compatible ChatML template ({% generation %} markers; no default system prompt)."""

IM_START = "<|im_start|>"
"""Opens a ChatML turn (followed by the role and a newline)."""
IM_END = "<|im_end|>"
"""Closes a ChatML turn; the EOS of every tokenizer that uses the ChatML template."""
ENDOFTEXT = "<|endoftext|>"
"""End-of-text token of GPT-2-style vocabularies; with ChatML it is free to serve as the pad token."""


def chatml() -> str:
    """The text of the ChatML template."""
    return CHATML_PATH.read_text(encoding="utf-8")
