"""Token-id rows to padded batches, the one way every stage and tool builds them.

Prompts for generation are left-padded (the generated tokens then line up at the right); whole sequences
for scoring and log-probs are right-padded. Positions count attended tokens only, so a left-padded row gets
the positions it would have unpadded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf import encoding


def right_padded(rows: list[list[int]], pad_id: int, device="cpu") -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask [B, T] (T = the longest row), right-padded, built on `device`."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.tensor([list(ids) + [pad_id] * (width - len(ids)) for ids in rows], dtype=torch.long,
                             device=device)
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows], dtype=torch.long,
                             device=device)
    return input_ids, attention


def left_padded(rows: list[list[int]], pad_id: int, device="cpu") -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask [B, T] (T = the longest row), left-padded, built on `device`."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in rows], dtype=torch.long,
                             device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], dtype=torch.long,
                             device=device)
    return input_ids, attention


def encode_prompts(tokenizer, prompts: list, max_prompt_length: int, device="cpu") -> tuple[Tensor, Tensor]:
    """Chat-rendered prompts (with the generation prompt, `encoding.prompt_ids`), over-long ones cut keeping
    their end, left-padded: ([B, P] ids, [B, P] mask) on `device`."""
    rows = [encoding.prompt_ids(tokenizer, p)[-max_prompt_length:] for p in prompts]
    return left_padded(rows, tokenizer.pad_token_id, device)


def position_ids(attention_mask: Tensor) -> Tensor:
    """[B, T] positions that count only attended tokens, so a left-padded row gets the positions it
    would have unpadded (0 at its first real token). Masked slots get 0; their outputs are never used.
    """
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)
