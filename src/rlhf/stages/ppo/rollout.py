"""PPO rollout: pick prompts, left-pad them, sample responses from the actor.

Shapes: B = prompts per rank, P = padded prompt length (<= data.max_prompt_length), R = generated
length (<= ppo.max_new_tokens; shorter when every row stopped at EOS), T = P + R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.batching import encode_prompts


@dataclass
class Rollout:
    """One batch of prompts and the responses the actor sampled for them."""

    prompts: list
    """B prompts in the internal schema (message lists), as given to a reward function."""
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

    def select(self, idx: Tensor) -> Rollout:
        """These rows, in this order."""
        rows = idx.tolist()
        return Rollout(prompts=[self.prompts[i] for i in rows], prompt_ids=self.prompt_ids[idx],
                       prompt_mask=self.prompt_mask[idx], response_ids=self.response_ids[idx], mask=self.mask[idx],
                       has_eos=self.has_eos[idx], responses=[self.responses[i] for i in rows])

    @property
    def input_ids(self) -> Tensor:
        """[B, T] prompt + response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        """[B, T]: left padding and tokens after the first EOS are masked out."""
        return torch.cat([self.prompt_mask, self.mask.long()], dim=1)


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


def make_decoder(ppo, max_prompt_length: int, device):
    """The run's static-cache decoder for `ppo.generation: static | graph`, or None for HF generate (`hf`, and
    `auto` until the graph path is measured faster on GPUs; on CPU the two are equally fast). `device` is
    where the decoder will run: the place for a per-device choice."""
    kind = "hf" if ppo.generation == "auto" else ppo.generation
    if kind == "hf":
        return None
    from rlhf.generation import StaticDecoder

    return StaticDecoder(max_prompt_length + ppo.max_new_tokens, use_graph=ppo.generation == "graph")


def generate(model, tokenizer, prompts: list, ppo, max_prompt_length: int, *, synced_gpus: bool,
             device="cpu", decoder=None) -> Rollout:
    """Sample one response per prompt on `device` (the run's) with `rlhf.generation.sample`. `model` is the
    bare (unwrapped, gathered) actor module; `decoder` (from `make_decoder`) samples on its static cache
    instead of HF generate; `synced_gpus` as in `sample` (the actor's forward is a collective under ZeRO-3)."""
    from rlhf.generation import Sampling, hf_config, sample

    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_length, device)
    config = hf_config(tokenizer, Sampling(temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p),
                       ppo.max_new_tokens)
    out = sample(model, tokenizer, prompt_ids, prompt_mask, config, decoder=decoder, synced_gpus=synced_gpus)
    return Rollout(prompts=list(prompts), prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=out.ids,
                   mask=out.mask, has_eos=out.has_eos, responses=out.texts)
