"""Model forwards shared by the stages.

- `next_token_logits`, the one forward for response log-probs: PPO (rollout and update), ORPO's loss and
  `rlhf eval` (log-probs, KL) all take the log-probs of response tokens from it, then
  `losses.logprobs_from_logits`. Only the positions that predict the span go through the LM head
  (`logits_to_keep`): a prompt position's vocabulary projection is never needed, and at short responses
  the prompt's are most of the head's cost.
- `ScalarHead`, a scored model (PPO's critic and reward model) as one module whose forward returns the
  head's output at every position.
"""

from __future__ import annotations

import torch
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


class ScalarHead(torch.nn.Module):
    """A 1-label sequence-classification model (PPO's critic, a reward model) as one module whose forward
    returns [B, T] float32: the head's output at every position, so the caller picks the positions (every
    response token for values, the EOS for scores) instead of the classifier's own pooling.

    Engines wrap this module and the stages call it whole. Under ZeRO-3 DeepSpeed starts each forward's
    parameter trace in a hook on the top-level module, and prefetches layers from that trace: a backbone
    and head called one by one would never reset it, and every layer's all-gather would block.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        model = self.model
        if hasattr(model, "get_base_model"):  # a peft model: its injected adapters stay active in the base model
            model = model.get_base_model()
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        head = model.score if hasattr(model, "score") else model.classifier
        return head(hidden).squeeze(-1).float()
