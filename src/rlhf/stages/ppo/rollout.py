"""PPO rollout: pick prompts, left-pad them, sample responses from the actor.

Shapes: B = prompts per rank, P = padded prompt length (<= data.max_prompt_length), R = generated
length (<= ppo.max_new_tokens; shorter when every row stopped at EOS), T = P + R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf import encoding
from rlhf.advantages import response_mask


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


def position_ids(attention_mask: Tensor) -> Tensor:
    """[B, T] positions that count only attended tokens, so a left-padded row gets the positions it
    would have unpadded (0 at its first real token). Masked slots get 0; their outputs are never used.
    """
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


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


def encode_prompts(tokenizer, prompts: list, max_prompt_length: int, device="cpu") -> tuple[Tensor, Tensor]:
    """Chat-rendered prompts (with the generation prompt), over-long ones cut keeping their end,
    left-padded: ([B, P] ids, [B, P] mask) on `device`, each made in one copy."""
    rows = [encoding.prompt_ids(tokenizer, p)[-max_prompt_length:] for p in prompts]
    width = max(len(r) for r in rows)
    padded = [[tokenizer.pad_token_id] * (width - len(r)) + list(r) for r in rows]
    flags = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return (torch.tensor(padded, dtype=torch.long, device=device),
            torch.tensor(flags, dtype=torch.long, device=device))


def generation_config(tokenizer, ppo, eos_ids: list[int]):
    """A complete GenerationConfig, so the model's own defaults (e.g. top_k=50) cannot leak in."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=ppo.temperature, top_p=ppo.top_p, top_k=ppo.top_k,
                            max_new_tokens=ppo.max_new_tokens, eos_token_id=eos_ids,
                            pad_token_id=tokenizer.pad_token_id, use_cache=True)


def make_decoder(ppo, max_prompt_length: int, device):
    """The run's static-cache decoder for `ppo.generation: static | graph`, or None for HF generate (`hf`, and
    `auto` until the graph path is measured faster on GPUs; on CPU the two are equally fast). `device` is
    where the decoder will run: the place for a per-device choice."""
    kind = "hf" if ppo.generation == "auto" else ppo.generation
    if kind == "hf":
        return None
    from rlhf.generation import StaticDecoder

    return StaticDecoder(max_prompt_length + ppo.max_new_tokens, use_graph=ppo.generation == "graph")


@torch.no_grad()
def generate(model, tokenizer, prompts: list, ppo, max_prompt_length: int, *, synced_gpus: bool,
             device="cpu", decoder=None) -> Rollout:
    """Sample one response per prompt on `device` (the run's). `model` is the bare (unwrapped, gathered)
    actor module; `decoder` (from `make_decoder`) samples on its static cache instead of HF generate.

    `synced_gpus` keeps every rank stepping until all are done: needed whenever the actor's forward is a
    collective (ZeRO-3), or ranks whose rows hit EOS early would leave the others waiting forever. The
    static decoder runs on the gathered actor, whose forward is not a collective, so it needs no syncing.
    """
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, max_prompt_length, device)
    eos_ids = [tokenizer.eos_token_id]
    if decoder is not None:
        from rlhf.generation import Sampling

        sampling = Sampling(temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p)
        response_ids = decoder.generate(model, prompt_ids, prompt_mask, max_new_tokens=ppo.max_new_tokens,
                                        sampling=sampling, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id)
    else:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                             generation_config=generation_config(tokenizer, ppo, eos_ids), synced_gpus=synced_gpus)
        response_ids = out[:, prompt_ids.shape[1]:]
    if response_ids.shape[1] == 0:  # cannot happen with max_new_tokens >= 1; keep shapes valid anyway
        response_ids = torch.full((len(prompts), 1), tokenizer.eos_token_id, dtype=torch.long, device=device)
    mask, has_eos = response_mask(response_ids, eos_ids, tokenizer.pad_token_id)
    response_ids = torch.where(mask.bool(), response_ids, tokenizer.pad_token_id)
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(response_ids, mask, strict=True)]
    return Rollout(prompts=list(prompts), prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                   response_ids=response_ids, mask=mask, has_eos=has_eos, responses=texts)
