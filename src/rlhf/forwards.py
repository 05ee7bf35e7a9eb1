"""Model forwards, one home for every stage and command: what a model says about tokens it is given.

    next_token_logits     the one forward for response log-probs: only the positions that predict the
                          span go through the LM head (`logits_to_keep`)
    policy_logits         PPO's actor (and reference) logits over the response, at the sampling temperature
    response_logprobs     PPO's actor (and reference) log-probs of the sampled response tokens
    values_of             PPO's critic: the value before each response token
    score_at_eos          a reward model's score, read at each row's EOS
    sequence_logprobs     log-probs of the response tokens of (ids, prompt length) sequences (`rlhf eval`)
    sequence_kl           the exact KL(policy || ref) along a response, summed (`rlhf eval`)
    pair_logps            [chosen, rejected] response log-probs of preference rows (DPO and ORPO
                          held-out checks)
    mean_response_logps   ORPO's loss forward: mean token log-prob of each response (differentiable)
    ScalarHead            a scored model (PPO's critic, a reward model) as one module returning the head's
                          output at every position

A model here is whatever is called: a module, or a PPO engine (`rlhf.engine.wrap`), whose forward runs
the module it holds. Shapes: B = rows, P = padded prompt length, R = response length, T = P + R,
V = vocabulary. Log-probs are float32 whatever the model's dtype (`losses.logprobs_from_logits`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf import encoding
from rlhf.batching import right_padded
from rlhf.losses import logprobs_from_logits, masked_mean
from rlhf.ppo_math import last_token_index

# ------------------------------------------------------------------------------------------ one forward


def next_token_logits(model, input_ids: Tensor, attention_mask: Tensor, first: int,
                      position_ids: Tensor | None = None) -> Tensor:
    """[B, T - first, V] logits in the model's dtype, column j predicting token `first + j` of each row
    (read at position `first + j - 1`). `first` >= 1; `position_ids` as the model takes them (PPO's
    left-padded rows need them; right-padded rows do not)."""
    keep = input_ids.shape[1] - first + 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=keep)
    return out.logits[:, -keep:-1]


# ------------------------------------------------------------------------------------------ PPO's models


def policy_logits(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, prompt_len: int,
                  temperature: float) -> Tensor:
    """[B, R, V] float32 logits that predict each response token (the last R = T - prompt_len columns of
    `input_ids`), divided by the sampling temperature, so that log-probs are those of the distribution the
    tokens were drawn from. Left-padded rows: `position_ids` from `batching.position_ids`."""
    logits = next_token_logits(model, input_ids, attention_mask, prompt_len, position_ids=position_ids)
    return logits.float() / temperature


def response_logprobs(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                      response_ids: Tensor, temperature: float) -> Tensor:
    """[B, R] float32 log-probs of the response tokens `response_ids` [B, R] (the last R columns of
    `input_ids`) under `model` at `temperature` (`policy_logits`). Carries the gradient when grad is on."""
    first = input_ids.shape[1] - response_ids.shape[1]  # the prompt's length
    logits = next_token_logits(model, input_ids, attention_mask, first, position_ids=position_ids)
    return logprobs_from_logits(logits.float() / temperature, response_ids)  # the logits of `policy_logits`


def values_of(critic, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, prompt_len: int) -> Tensor:
    """[B, R] value of the state before each response token (read at the position that predicts it).
    `critic`: a `ScalarHead`, or the engine that holds one."""
    return critic(input_ids, attention_mask, position_ids)[:, prompt_len - 1:-1]


def score_at_eos(reward, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, mask: Tensor) -> Tensor:
    """[B] reward read at each row's last counted response token: its EOS, never the padding after it
    (the last response token when there is no EOS). `reward`: a `ScalarHead`, or the engine that holds one;
    `mask` [B, R] the counted response tokens."""
    out = reward(input_ids, attention_mask, position_ids)
    at = input_ids.shape[1] - mask.shape[1] + last_token_index(mask)
    return out.gather(1, at.unsqueeze(1)).squeeze(1)


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


# ------------------------------------------------------------------------------------------ sequences


def encode_responses(tokenizer, prompts: list[list[dict]], responses: list[str]) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per pair, the package's one encoding: chat prompt + response + EOS."""
    return [encoding.encode(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]


def _batches(seqs: list[tuple[list[int], int]], pad_id: int, batch_size: int, device):
    """Right-padded (batch, input_ids, attention_mask) chunks of (ids, n) sequences, built on `device`."""
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start:start + batch_size]
        yield (batch, *right_padded([ids for ids, _ in batch], pad_id, device))


def _response_logits(model, batch, input_ids, attention):
    """(float32 logits predicting the tokens from the batch's earliest response start on, that start - 1),
    without gradient."""
    start = min(n for _, n in batch) - 1  # position t predicts token t + 1
    with torch.no_grad():
        logits = next_token_logits(model, input_ids, attention, start + 1)
    return logits.float(), start  # log-softmax in fp32 even for a bf16/fp16 model


def _device(model):
    return next(model.parameters()).device


def sequence_logprobs(model, seqs: list[tuple[list[int], int]], pad_id: int, batch_size: int = 8) -> list:
    """Log-probs of the response tokens (ids[n:]) of each (ids, n) sequence: a float32 [len(ids) - n] tensor
    each, on the model's device.

    Right-padded batches; no gradient. The model should be in eval mode (dropout off).
    """
    out = []
    for batch, input_ids, attention in _batches(seqs, pad_id, batch_size, _device(model)):
        logits, start = _response_logits(model, batch, input_ids, attention)
        token_logps = logprobs_from_logits(logits, input_ids[:, start + 1:])  # column j predicts token start+1+j
        out.extend(token_logps[i, n - 1 - start:len(ids) - 1 - start] for i, (ids, n) in enumerate(batch))
    return out


def sequence_kl(policy, ref, seqs: list[tuple[list[int], int]], pad_id: int, batch_size: int = 8) -> list[float]:
    """Per (ids, n) sequence: the sum over its response positions of the exact KL(policy || ref) between the
    two next-token distributions (over the whole vocabulary), along the policy's own response.

    Never negative, and 0 exactly when the two models agree at every position; on sampled responses its
    mean is the sequence-level KL, with less noise than the sampled log-ratio (which on greedy responses
    is not a KL at all and can come out negative)."""
    out = []
    for batch, input_ids, attention in _batches(seqs, pad_id, batch_size, _device(policy)):
        logits, start = _response_logits(policy, batch, input_ids, attention)
        logp = torch.log_softmax(logits, dim=-1)
        logq = torch.log_softmax(_response_logits(ref, batch, input_ids, attention)[0], dim=-1)
        per_pos = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)  # clamp: float rounding
        out.extend(torch.stack([per_pos[i, n - 1 - start:len(ids) - 1 - start].sum()
                                for i, (ids, n) in enumerate(batch)]).tolist())
    return out


def pair_logps(model, tokenizer, rows: list[dict], *, mean: bool = False, batch_size: int = 8) -> list[list[float]]:
    """[chosen, rejected] response log-prob of `model` per internal-schema preference row: the sum over the
    response tokens (DPO's log pi(y|x)), or with `mean` their mean (ORPO's log p)."""
    if not rows:
        return []
    prompts = [r["prompt"] for r in rows]
    sides = []
    for side in ("chosen", "rejected"):
        seqs = encode_responses(tokenizer, prompts, [encoding.content(r[side]) for r in rows])
        logps = sequence_logprobs(model, seqs, tokenizer.pad_token_id, batch_size)
        sides.append(torch.stack([lp.mean() if mean else lp.sum() for lp in logps]).tolist())
    return [[chosen, rejected] for chosen, rejected in zip(*sides, strict=True)]


def mean_response_logps(model, batch: dict) -> Tensor:
    """Mean token log-prob of each row's response, [2B] (differentiable): ORPO's forward over a paired batch
    (right-padded `input_ids`, `attention_mask`, and `completion_mask` 1 on response tokens)."""
    logits = next_token_logits(model, batch["input_ids"], batch["attention_mask"], 1)
    token_logps = logprobs_from_logits(logits, batch["input_ids"][:, 1:])
    return masked_mean(token_logps, batch["completion_mask"][:, 1:], dim=-1)
