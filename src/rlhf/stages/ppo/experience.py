"""PPO, phase 1: from prompts to the experience one update learns from.

    prompts --generate--> Rollout --forward_all--> Forwards --make_experience--> Experience
            (actor samples)         (actor, ref, critic,          (shaped rewards, advantages and
                                     reward: no grad)               returns; `rlhf.ppo_math`)

Advantages: GAE over the critic's values (`ppo.advantage: gae`), or critic-free from the scores of each
prompt's group of `ppo.samples_per_prompt` responses (`grpo`, `dr_grpo`, `rloo`, `reinforce_baseline`;
then there is no critic, and its values are zeros). A group's rows are on one rank, tagged by
`Rollout.group`, in any order.

Shapes: B = rows per rank, P = padded prompt length (<= data.max_prompt_length), R = response length
(<= ppo.max_new_tokens; shorter when every row stopped at EOS), T = P + R, V = vocabulary.

Every forward here and in the update is one of `rlhf.forwards`, called on the engines: positions read
from the attention mask (`batching.position_ids`), in chunks of the update's micro-batch size over the
same [B, T] tensors, with dropout off, so that the update's first log-probs equal these bit for bit
(ratio exactly 1). With `ppo.reuse_rollout_forward` the first chunk's actor and critic forwards keep
their graphs (`KeptForward`), and the update's first micro-batch backpropagates through them instead of
running them again (`loop.train_step` puts the rows in the update's first-epoch order first).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from rlhf.batching import encode_prompts, position_ids
from rlhf.config import REWARD_MODEL
from rlhf.engine import adapters_disabled
from rlhf.forwards import policy_logits, response_logprobs, score_at_eos, values_of
from rlhf.losses import entropy_from_logits, logprobs_from_logits, masked_mean
from rlhf.ppo_math import (
    broadcast_advantages,
    dr_grpo_advantages,
    gae,
    grpo_advantages,
    masked_whiten,
    overlong_penalty,
    per_token_rewards,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)

log = logging.getLogger("rlhf")
Watch = Callable[[str], contextlib.AbstractContextManager]  # role -> context around that model's work


# ------------------------------------------------------------------------------------------ records


@dataclass
class Rollout:
    """One batch of prompts and the responses the actor sampled for them."""

    rows: list[dict]
    """B prompt rows in the internal schema (`prompt`, and `fields` a program reward may read)."""
    prompt_ids: Tensor
    """[B, P] long: prompt tokens, left-padded with the pad id."""
    prompt_mask: Tensor
    """[B, P] long: 1 on real prompt tokens, 0 on left padding."""
    response_ids: Tensor
    """[B, R] long: sampled tokens; the pad id after the first EOS."""
    mask: Tensor
    """[B, R] float: 1 on response tokens that count (up to and including the first EOS), else 0."""
    has_eos: Tensor
    """[B] bool: the response emitted EOS within max_new_tokens."""
    responses: list[str]
    """B response texts: counted tokens decoded without special tokens (so without the EOS)."""
    group: Tensor
    """[B] long: which of this rank's prompts the row answers (its group: `ppo.samples_per_prompt` rows)."""

    def select(self, idx: Tensor) -> Rollout:
        """These rows, in this order."""
        rows = idx.tolist()
        return Rollout(rows=[self.rows[i] for i in rows], prompt_ids=self.prompt_ids[idx],
                       prompt_mask=self.prompt_mask[idx], response_ids=self.response_ids[idx], mask=self.mask[idx],
                       has_eos=self.has_eos[idx], responses=[self.responses[i] for i in rows], group=self.group[idx])

    @property
    def prompts(self) -> list:
        """B prompts (message lists)."""
        return [row["prompt"] for row in self.rows]

    @property
    def input_ids(self) -> Tensor:
        """[B, T] prompt + response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """[B, T]: left padding and tokens after the first EOS are masked out."""
        return torch.cat([self.prompt_mask, self.mask.long()], dim=1)


@dataclass
class KeptForward:
    """The actor's and critic's forwards of a rollout's first micro-batch, still attached to their graphs
    (`ppo.reuse_rollout_forward`), for the update's first micro-batch to backpropagate through."""

    logprobs: Tensor  # [rows, R] actor log-probs (requires grad)
    values: Tensor | None  # [rows, R] critic values (requires grad); None without a critic


@dataclass
class Forwards:
    """One no-grad pass of every model over a rollout (`forward_all`)."""

    logprobs: Tensor  # [B, R] actor log-probs of the sampled tokens
    ref_logprobs: Tensor  # [B, R] reference log-probs
    values: Tensor  # [B, R] critic values (zeros without a critic)
    entropy: Tensor  # [B, R] actor entropy per position
    raw_scores: Tensor  # [B] reward before normalisation: the sources' raw scores summed by weight
    source_scores: dict[str, Tensor] = field(default_factory=dict)  # [B] raw scores per source (`Scorer`)
    kept: KeptForward | None = None  # with `keep_first`: the first chunk's graphs


@dataclass
class Experience:
    """Everything the PPO update needs for one rollout. Row-aligned, so `select` cuts minibatches."""

    input_ids: Tensor  # [B, T] prompt (left-padded) + response (pad after EOS)
    attention_mask: Tensor  # [B, T]
    position_ids: Tensor  # [B, T]
    response_ids: Tensor  # [B, R]
    mask: Tensor  # [B, R] float, 1 on counted response tokens
    logprobs: Tensor  # [B, R] actor log-probs at rollout time
    ref_logprobs: Tensor  # [B, R]
    values: Tensor  # [B, R] critic values at rollout time (zeros without a critic)
    raw_scores: Tensor  # [B] reward before normalisation and EOS penalty
    scores: Tensor  # [B] reward after normalisation and EOS penalty
    kl: Tensor  # [B, R] per-token KL estimate, 0 outside the mask
    rewards: Tensor  # [B, R] shaped rewards
    advantages: Tensor  # [B, R] (whitened when configured)
    returns: Tensor  # [B, R] the critic's targets (unused without a critic)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]

    def select(self, idx: Tensor) -> Experience:
        return Experience(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


# ------------------------------------------------------------------------------------------ rollout


class PromptSampler:
    """Endless shuffled passes over the prompt rows. Its whole state is (epoch, index), for resume.

    Every rank draws the same global batch and keeps its own slice, so ranks see different prompts.
    """

    def __init__(self, n_rows: int, seed: int):
        if n_rows <= 0:
            raise ValueError("no prompts to sample from")
        self.n_rows, self.seed = n_rows, seed
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)  # on the host: a list of row numbers
        return torch.randperm(self.n_rows, generator=gen, device="cpu").tolist()

    def take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self._order(self.epoch)
            grab = order[self.index:self.index + n - len(out)]
            out += grab
            self.index += len(grab)
            if self.index >= self.n_rows:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def make_decoder(ppo, max_prompt_length: int):
    """The run's static-cache decoder for `ppo.generation: static | graph`, or None for HF generate (`hf`, and
    `auto` until the graph path is measured faster on GPUs; on CPU the two are equally fast)."""
    kind = "hf" if ppo.generation == "auto" else ppo.generation
    if kind == "hf":
        return None
    from rlhf.generation import StaticDecoder

    return StaticDecoder(max_prompt_length + ppo.max_new_tokens, use_graph=ppo.generation == "graph")


def generate(model, tokenizer, rows: list[dict], ppo, max_prompt_length: int, *, synced_gpus: bool,
             device="cpu", decoder=None) -> Rollout:
    """Sample `ppo.samples_per_prompt` responses per prompt row on `device` (the run's) with
    `rlhf.generation.sample`, a prompt's rows next to each other. `model` is the bare (unwrapped, gathered)
    actor module; `decoder` (from `make_decoder`) samples on its static cache instead of HF generate;
    `synced_gpus` as in `sample` (the actor's forward is a collective under ZeRO-3)."""
    from rlhf.generation import Sampling, hf_config, sample

    k = ppo.samples_per_prompt
    rows = [row for row in rows for _ in range(k)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, [row["prompt"] for row in rows], max_prompt_length, device)
    config = hf_config(tokenizer, Sampling(temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p),
                       ppo.max_new_tokens)
    out = sample(model, tokenizer, prompt_ids, prompt_mask, config, decoder=decoder, synced_gpus=synced_gpus)
    group = torch.arange(len(rows) // k, device=device).repeat_interleave(k)
    return Rollout(rows=rows, prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=out.ids,
                   mask=out.mask, has_eos=out.has_eos, responses=out.texts, group=group)


# ------------------------------------------------------------------------------------------ forwards


class Scorer:
    """Raw scores [B] of a rollout from each of the reward's sources (`ppo.reward_sources`):

    - the reward model's engine, sharing the policy's tokenizer: scored on the rollout's own ids at the EOS;
    - the reward model's engine with another tokenizer: responses are decoded and re-tokenized the canonical
      way (`rlhf.encoding`, as the reward stage trained it) and scored by `rlhf.scoring.score`;
    - programs (`rlhf.programs.Program`) and reward servers (`rlhf.remote_reward.RemoteScorer`), each given
      the prompt rows and the response texts, and named by its `spec` (the function, or the url).
    """

    def __init__(self, *, engine=None, tokenizer=None, same_tokenizer: bool = True, programs=(), batch_size: int = 8,
                 device="cpu"):
        self.engine, self.tokenizer, self.same_tokenizer = engine, tokenizer, same_tokenizer
        self.programs, self.batch_size, self.device = list(programs), batch_size, device

    @torch.no_grad()
    def __call__(self, rollout: Rollout, chunks: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> dict[str, Tensor]:
        out = {REWARD_MODEL: self._model_scores(rollout, chunks)} if self.engine is not None else {}
        for program in self.programs:
            values = program(rollout.rows, rollout.responses)
            out[program.spec] = torch.tensor(values, dtype=torch.float32, device=self.device)
        return out

    def _model_scores(self, rollout: Rollout, chunks) -> Tensor:
        if self.same_tokenizer:
            return torch.cat([score_at_eos(self.engine, ids, attn, pos, m) for ids, attn, pos, m in chunks])
        from rlhf.scoring import encoded_batches

        scores = []
        for ids, attn in encoded_batches(self.tokenizer, rollout.prompts, rollout.responses, self.batch_size,
                                         self.device):  # right-padded: the score is read at the last token
            out = self.engine(ids, attn)
            scores.append(out.gather(1, (attn.sum(dim=1, keepdim=True) - 1)).squeeze(1))
        return torch.cat(scores)


def blame_scores(source_scores: dict[str, Tensor], rows: list[dict]) -> str | None:
    """Which source gave the first non-finite score, and for which prompt row; None when all are finite."""
    from rlhf.programs import row_name

    for source, scores in source_scores.items():
        bad = (~torch.isfinite(scores)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            who = "the reward model" if source == REWARD_MODEL else source
            return f"the reward score of {who} for prompt row {row_name(rows[i])}"
    return None


def weighted_sum(source_scores: dict[str, Tensor], sources, stats: dict | None = None) -> Tensor:
    """The reward [B]: each source's scores times its weight, summed in `sources`' order; with `stats` the
    reward model's are standardised first ((raw - mean) / std, its stored statistics)."""
    total = None
    for src in sources:
        scores = source_scores[src.name].float()
        if src.source == REWARD_MODEL and stats is not None:
            scores = (scores - stats["mean"]) / max(stats["std"], 1e-6)
        total = src.weight * scores if total is None else total + src.weight * scores
    return total


# ------------------------------------------------------------------------------------------ experience


def normalize_scores(source_scores: dict[str, Tensor], sources, has_eos: Tensor, stats: dict | None,
                     missing_eos_penalty: float | None) -> Tensor:
    """The reward of each response: `weighted_sum` of its sources (the reward model's standardised with its
    stored stats, when given), minus the penalty for responses that never emitted EOS."""
    scores = weighted_sum(source_scores, sources, stats)
    if missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, scores - missing_eos_penalty)
    return scores


@torch.no_grad()
def forward_all(rollout: Rollout, actor, ref, critic, scorer: Scorer, *, micro_batch: int,
                temperature: float, sources, keep_first: bool = False, watch: Watch | None = None) -> Forwards:
    """One pass of each model over the rollout, in micro-batch chunks, without gradient but, with
    `keep_first`, for the first chunk's actor and critic forwards: `Forwards.kept` holds those with their
    graphs (run through the engines as the update runs them, so the update can use them as its own).
    `watch(role)` (optional) is a context manager around each model's work (the stage turns an
    out-of-memory error there into one line).

    `ref=None` means a LoRA actor: the reference is the actor's engine with its adapters disabled;
    `critic=None` a critic-free run (values are zeros). `sources` (`ppo.reward_sources`) weigh the
    scorer's raw scores into `raw_scores`.
    """
    watch = watch or (lambda role: contextlib.nullcontext())
    ids, attn = rollout.input_ids, rollout.attention_mask
    pos = position_ids(attn)
    prompt_len = rollout.prompt_ids.shape[1]
    out: dict[str, list[Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
    chunks, kept = [], None
    for start in range(0, ids.shape[0], micro_batch):
        sl = slice(start, start + micro_batch)
        chunk = (ids[sl], attn[sl], pos[sl], rollout.mask[sl])
        chunks.append(chunk)
        labels = rollout.response_ids[sl]
        keep = keep_first and start == 0
        with watch("actor"), torch.set_grad_enabled(keep):
            logits = policy_logits(actor, *chunk[:3], prompt_len, temperature)  # the entropy needs them whole
            logprobs = logprobs_from_logits(logits, labels)
        out["logprobs"].append(logprobs.detach())
        out["entropy"].append(entropy_from_logits(logits.detach()))
        del logits
        if critic is None:
            values = torch.zeros_like(logprobs, dtype=torch.float32)
        else:
            with watch("critic"), torch.set_grad_enabled(keep):
                values = values_of(critic, *chunk[:3], prompt_len)
        out["values"].append(values.detach())
        if keep:
            kept = KeptForward(logprobs=logprobs, values=None if critic is None else values)
        with adapters_disabled(actor) if ref is None else contextlib.nullcontext(), watch("ref"):
            out["ref_logprobs"].append(response_logprobs(actor if ref is None else ref, *chunk[:3], labels,
                                                         temperature))
    with watch("reward"):
        source_scores = scorer(rollout, chunks)
    return Forwards(**{k: torch.cat(v) for k, v in out.items()}, raw_scores=weighted_sum(source_scores, sources),
                    source_scores=source_scores, kept=kept)


GROUP_ESTIMATORS = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}


def group_advantages(returns: Tensor, group: Tensor, mask: Tensor, ppo, reduce=None) -> tuple[Tensor, Tensor]:
    """A critic-free estimator's (advantages, returns) [B, R] from each row's scalar return [B]: the rows
    sorted into their groups (contiguous, as the estimators take them), estimated, and put back in place.
    `reinforce_baseline` whitens over the global batch with `reduce` (collective when given)."""
    k = ppo.samples_per_prompt
    order = torch.argsort(group, stable=True)  # a group's rows next to each other
    if ppo.advantage == "reinforce_baseline":
        adv_sorted, _ = reinforce_pp_baseline_advantages(returns[order], k, mask[order], reduce=reduce)
    else:
        adv_sorted, _ = broadcast_advantages(GROUP_ESTIMATORS[ppo.advantage](returns[order], k), mask[order])
    advantages = torch.empty_like(adv_sorted)
    advantages[order] = adv_sorted
    return advantages, broadcast_advantages(returns.float(), mask)[0]


@torch.no_grad()
def make_experience(rollout: Rollout, fwd: Forwards, ppo, *, kl_coef: float,
                    reward_stats: dict | None, reduce=None) -> Experience:
    """Scores -> shaped per-token rewards (score at EOS, -kl_coef * KL on every token, or no KL term with
    `ppo.kl_in: loss`) -> advantages: GAE, or a critic-free estimator on each row's return (its score minus
    its summed KL term) within its group.

    `reduce` (a sum over ranks) whitens advantages with the statistics of the whole global batch, so
    the result does not depend on how rows are split over ranks; collective when given."""
    mask = rollout.mask
    scores = normalize_scores(fwd.source_scores, ppo.reward_sources, rollout.has_eos, reward_stats,
                              ppo.missing_eos_penalty)
    if ppo.overlong_penalty is not None:
        buffer = ppo.overlong_buffer or max(1, ppo.max_new_tokens // 4)
        scores = scores - overlong_penalty(mask.sum(dim=1), ppo.max_new_tokens, buffer, ppo.overlong_penalty)
    reward_kl_coef = kl_coef if ppo.kl_in == "reward" else 0.0
    rewards, kl = per_token_rewards(scores, fwd.logprobs, fwd.ref_logprobs, mask, reward_kl_coef, ppo.kl_estimator)
    values = torch.where(mask.bool(), fwd.values, 0.0)
    if ppo.advantage == "gae":
        advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask, reduce=reduce)
    else:
        advantages, returns = group_advantages(rewards.sum(dim=1), rollout.group, mask, ppo, reduce=reduce)
    attn = rollout.attention_mask
    return Experience(input_ids=rollout.input_ids, attention_mask=attn, position_ids=position_ids(attn),
                      response_ids=rollout.response_ids, mask=mask, logprobs=fwd.logprobs,
                      ref_logprobs=fwd.ref_logprobs, values=values, raw_scores=fwd.raw_scores.float(),
                      scores=scores, kl=kl, rewards=rewards, advantages=advantages, returns=returns)


def experience_stats(exp: Experience, entropy: Tensor, has_eos: Tensor, kl_coef: float) -> dict[str, float]:
    """Per-rank rollout statistics under `objective/` and `rollout/`."""
    kl_per_row = exp.kl.sum(dim=1)
    return {
        "objective/score_raw_mean": exp.raw_scores.mean().item(),
        "objective/score_raw_std": exp.raw_scores.std(unbiased=False).item(),
        "objective/score_mean": exp.scores.mean().item(),
        "objective/score_std": exp.scores.std(unbiased=False).item(),
        "objective/kl": kl_per_row.mean().item(),
        "objective/kl_coef": kl_coef,
        "objective/non_score_reward": (-kl_coef * kl_per_row).mean().item(),
        "objective/entropy": masked_mean(entropy, exp.mask).item(),
        "rollout/response_length": exp.mask.sum(dim=1).mean().item(),
        "rollout/eos_share": has_eos.float().mean().item(),
    }
