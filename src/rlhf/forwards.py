"""The one forward for response log-probs: logits that predict a span of a sequence's tokens.

PPO (rollout and update), ORPO's loss and `rlhf eval` (log-probs, KL) all take the log-probs of response
tokens from `next_token_logits`, then `losses.logprobs_from_logits`. Only the positions that predict the
span go through the LM head (`logits_to_keep`): a prompt position's vocabulary projection is never needed,
and at short responses the prompt's are most of the head's cost.
"""

from __future__ import annotations

from torch import Tensor


def next_token_logits(model, input_ids: Tensor, attention_mask: Tensor, first: int,
                      position_ids: Tensor | None = None) -> Tensor:
    """[B, T - first, V] logits in the model's dtype, column j predicting token `first + j` of each row
    (read at position `first + j - 1`). `first` >= 1; `position_ids` as the model takes them (PPO's
    left-padded rows need them; right-padded rows do not)."""
    keep = input_ids.shape[1] - first + 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=keep)
    return out.logits[:, -keep:-1]
