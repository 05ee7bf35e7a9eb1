"""Rollout sampling on a static KV cache, with the decode step replayed as a CUDA graph on GPUs.

HF `generate` pays Python and kernel-launch overhead for every token: on a GPU its decode step takes
tens of milliseconds where reading the weights takes well under one. This path removes most of that:

- one `StaticCache` of `max_len` slots (longest prompt + `max_new_tokens`), allocated once per batch
  shape and reset in place between rollouts, so every buffer keeps its address;
- the attention mask given to the model as a ready 4D additive mask, and positions given explicitly, so
  the forward makes no host-side decision from tensor values (graph-safe);
- on CUDA (`use_graph`), the one-token decode forward captured once as a CUDA graph and replayed for every
  token; captured again only when the batch shape or the weights' storage changes (a ZeRO-3 actor is
  gathered into new storage for each rollout). Where capture fails, decoding goes on eagerly, with one
  warning per decoder; capture is tried again for a new batch shape or model, and at the next rollout after
  running out of memory (which may pass), never again for a shape and model where it failed otherwise;
- `release()` after a rollout frees the cache, the buffers and the graph's memory pool for the experience
  and update phases; the next rollout allocates them again;
- "has every row stopped?" read on the host every DONE_CHECK_EVERY tokens instead of every token, with the
  tokens past the last row's stop cut off and the random generator put back as it was after that step.

Sampling follows HF's rules exactly (temperature, then top-k, then top-p, on float32 logits, one
`torch.multinomial` draw per step on the default generator), rows that emitted an EOS get the pad id
from then on, and decoding stops when every row has stopped or after `max_new_tokens`. Greedy decoding
gives HF generate's tokens; so does sampling with the same seed, as long as the logits agree to the bit.

Shapes: B rows, P padded prompt length, L = max_len cache slots, V vocabulary.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf.ppo_math import response_mask

log = logging.getLogger("rlhf")

# Decode steps between host reads of "has every row stopped?": each read waits for the GPU to drain, which
# stalls the queue of the next steps; a batch that ends early decodes at most this many steps in vain.
DONE_CHECK_EVERY = 8


@dataclass(frozen=True)
class Sampling:
    """What to draw each token from. `greedy` ignores the other fields (argmax)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False


def warp_logits(logits: Tensor, s: Sampling) -> Tensor:
    """[B, V] float32 logits -> the scores HF samples from: divided by the temperature, then everything
    below the k-th largest set to -inf, then the smallest tokens whose probabilities sum to at most
    1 - top_p set to -inf (the most likely token always stays)."""
    scores = logits
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k:
        kth = torch.topk(scores, min(s.top_k, scores.shape[-1]))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - s.top_p)
        drop_sorted[..., -1:] = False
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return scores


def next_tokens(logits: Tensor, s: Sampling) -> Tensor:
    """[B] token ids drawn from [B, V] logits of the model's dtype."""
    scores = warp_logits(logits.float(), s)
    if s.greedy:
        return scores.argmax(dim=-1)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean [B, 1, Q, L] (True: may attend) -> the additive mask HF attention adds to its scores."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


def prefill_mask(prompt_mask: Tensor, max_len: int, dtype: torch.dtype) -> Tensor:
    """[B, 1, P, L]: a real prompt token sees the real tokens up to itself; a padding slot sees only itself
    (never a fully masked row, which would put NaN into the cache it writes)."""
    p = prompt_mask.shape[1]
    slots = torch.arange(max_len, device=prompt_mask.device)
    rows = torch.arange(p, device=prompt_mask.device)
    causal = slots[None, :] <= rows[:, None]  # [P, L]
    real = torch.zeros((prompt_mask.shape[0], max_len), dtype=torch.bool, device=prompt_mask.device)
    real[:, :p] = prompt_mask.bool()
    allowed = causal[None] & real[:, None, :]
    allowed |= (slots[None, :] == rows[:, None])[None]  # every slot sees itself
    return additive_mask(allowed[:, None], dtype)


class StaticDecoder:
    """Samples responses on one static cache; keep one per run so buffers and the graph are reused."""

    def __init__(self, max_len: int, *, use_graph: bool):
        self.max_len, self.use_graph = max_len, use_graph
        self.cache = None
        self._key = None  # (batch, dtype, device, model id) the cache and buffers were made for
        self._graph = None
        self._graph_key = None  # also the weights' storage addresses
        self._bufs: dict[str, Tensor] = {}
        self.capture_seconds: float | None = None
        self.capture_error: str | None = None  # why the first failed capture failed (warned once)
        self._failed_key = None  # the buffers' key a capture failed for: not tried again for it

    # ------------------------------------------------------------------ buffers

    def _prepare(self, model, batch: int, device, dtype) -> None:
        from transformers import StaticCache

        key = (batch, dtype, str(device), id(model))
        if key != self._key:
            self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
            self._bufs = {
                "ids": torch.zeros((batch, 1), dtype=torch.long, device=device),
                "pos": torch.zeros((batch, 1), dtype=torch.long, device=device),
                "mask": torch.zeros((batch, 1, 1, self.max_len), dtype=dtype, device=device),
            }
            self._key, self._graph, self._graph_key = key, None, None
        else:
            self.cache.reset()

    def release(self) -> None:
        """Free the static cache, the decode buffers and the CUDA graph with its memory pool (call after a
        rollout, so the experience and update phases have that memory); the next `generate` allocates them
        again. The memory goes back to torch's caching allocator, which reuses it (a dead graph's pool once
        it needs the room)."""
        self.cache, self._key, self._bufs = None, None, {}
        self._graph, self._graph_key = None, None

    def _decode_forward(self, model) -> Tensor:
        """One token per row through the model at the cache's next slot: [B, V] logits (a static buffer
        when replayed from the graph)."""
        b = self._bufs
        out = model(input_ids=b["ids"], position_ids=b["pos"], attention_mask=b["mask"],
                    past_key_values=self.cache, use_cache=True)
        return out.logits[:, -1]

    # ------------------------------------------------------------------ CUDA graph

    def _weights_key(self, model) -> tuple:
        return (self._key, tuple(p.data_ptr() for p in model.parameters()))

    def _capture(self, model) -> None:
        """Record the decode step. Warm-up and capture write to the cache, so it is reset after."""
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # kernels pick their algorithms and workspaces outside the capture
                self._decode_forward(model)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._bufs["logits"] = self._decode_forward(model)
        self.cache.reset()
        self._graph, self._graph_key = graph, self._weights_key(model)
        first = self.capture_seconds is None
        self.capture_seconds = time.perf_counter() - start
        (log.info if first else log.debug)("rollout: decode step captured as a CUDA graph in %.2f s",
                                           self.capture_seconds)

    def _buffers_on_gpu(self) -> bool:
        """Whether the decode buffers live on a GPU, where a CUDA graph can replay the step on them."""
        return torch.cuda.is_available() and self._bufs["ids"].is_cuda

    def _graph_ready(self, model) -> bool:
        """Whether to replay the graph this rollout, capturing it first when needed (and worth trying)."""
        if not (self.use_graph and self._buffers_on_gpu()):
            return False
        if self._graph is not None and self._graph_key == self._weights_key(model):
            return True
        if self._failed_key == self._key:  # same batch shape and model: it would fail the same way
            return False
        try:
            self._capture(model)
            return True
        except Exception as err:  # an op the graph cannot hold, or no memory for its pool: decode eagerly
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            # out of memory may pass (the next rollout may find the room); anything else would fail again
            self._failed_key = None if isinstance(err, torch.cuda.OutOfMemoryError) else self._key
            self._graph = None
            self.cache.reset()
            if self.capture_error is None:
                self.capture_error = reason
                log.warning("rollout: could not capture the decode step as a CUDA graph (%s); decoding without "
                            "it (tried again for another batch shape or after running out of memory)", reason)
            else:
                log.debug("rollout: CUDA graph capture failed again (%s)", reason)
            return False

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, model, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, sampling: Sampling,
                 eos_ids: list[int], pad_id: int) -> Tensor:
        """[B, R] sampled tokens (R <= max_new_tokens), the pad id after each row's first EOS."""
        batch, p = prompt_ids.shape
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if p + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {p} + {max_new_tokens} new tokens exceed the cache's {self.max_len} slots")
        device = prompt_ids.device
        dtype = next(model.parameters()).dtype
        self._prepare(model, batch, device, dtype)
        graph = self._graph_ready(model)
        real = torch.zeros((batch, self.max_len), dtype=torch.bool, device=device)
        real[:, :p] = prompt_mask.bool()
        self._bufs["mask"].copy_(additive_mask(real[:, None, None, :], dtype))  # then opened one slot per step
        positions = (prompt_mask.long().cumsum(dim=1) - 1).clamp_min(0)
        out = model(input_ids=prompt_ids, position_ids=positions, attention_mask=prefill_mask(prompt_mask,
                    self.max_len, dtype), past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        next_pos = prompt_mask.long().sum(dim=1, keepdim=True)
        eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        rng = None if sampling.greedy else _default_generator(device)
        tokens, after_draw, checked = [], [], 0  # after_draw[i]: the generator's state after step checked + i
        for step in range(max_new_tokens):
            token = next_tokens(logits, sampling)
            if rng is not None:
                after_draw.append(rng.get_state())  # host-side (a CUDA generator's seed and offset): no sync
            token = torch.where(done, pad_id, token)
            tokens.append(token)
            done |= torch.isin(token, eos)
            last = step == max_new_tokens - 1
            if last or (step + 1) % DONE_CHECK_EVERY == 0:
                ids = torch.stack(tokens, dim=1)
                # one host read: the step the last row emitted its (first) EOS at, or -1 while a row goes on
                stop = int(torch.where(done.all(), torch.isin(ids, eos).int().argmax(dim=1).max(), -1))
                if stop >= 0:  # end as a check after every token would have, the generator as that step left it
                    if rng is not None:
                        rng.set_state(after_draw[stop - checked])
                    return ids[:, :stop + 1]
                if last:
                    break
                after_draw, checked = [], step + 1
            self._bufs["mask"][..., p + step] = 0  # as HF: every generated slot counts, padding after EOS included
            self._bufs["ids"].copy_(token[:, None])
            self._bufs["pos"].copy_(next_pos + step)
            if graph:
                self._graph.replay()
                logits = self._bufs["logits"]
            else:
                logits = self._decode_forward(model)
        return ids


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator `torch.multinomial` draws from for tensors on `device`."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index]  # a tensor's CUDA device always has its index
    return torch.default_generator


# ------------------------------------------------------------------------------------ the one way to sample


@dataclass
class Responses:
    """Responses sampled for a batch of left-padded prompts, cut by the one EOS rule
    (`ppo_math.response_mask`: up to and including the first EOS, else up to the last non-pad token)."""

    ids: Tensor  # [B, R] long: sampled tokens, the pad id after each row's first EOS
    mask: Tensor  # [B, R] float: 1 on the tokens that count
    has_eos: Tensor  # [B] bool: the row emitted EOS within max_new_tokens
    texts: list[str]  # the counted tokens decoded without special tokens (so without the EOS)

    def token_lists(self) -> list[list[int]]:
        """The counted tokens of each row (its EOS included)."""
        return [row[m.bool()].tolist() for row, m in zip(self.ids, self.mask, strict=True)]


def hf_config(tokenizer, sampling: Sampling, max_new_tokens: int):
    """A complete GenerationConfig for HF generate, so the model's own generation defaults (e.g. top_k=50)
    cannot leak in; EOS and pad from the tokenizer."""
    from transformers import GenerationConfig

    common = {"max_new_tokens": max_new_tokens, "eos_token_id": [tokenizer.eos_token_id],
              "pad_token_id": tokenizer.pad_token_id, "use_cache": True}
    if sampling.greedy:
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                            top_k=sampling.top_k, **common)


def sampling_of(config) -> Sampling:
    """The `Sampling` a GenerationConfig from `hf_config` describes (for the static decoder)."""
    if not config.do_sample:
        return Sampling(greedy=True)
    return Sampling(temperature=config.temperature, top_k=config.top_k or 0, top_p=config.top_p)


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, config, *,
           decoder: StaticDecoder | None = None, synced_gpus: bool = False) -> Responses:
    """Responses to left-padded prompts ([B, P] ids and mask, on the model's device) under `config` (a
    GenerationConfig from `hf_config`): through `decoder` (a `StaticDecoder`) when given, else HF generate.
    PPO rollouts, `rlhf eval` and `rlhf data synth` all sample here, so they share the sampling rules and
    the EOS rule.

    `synced_gpus` keeps every rank stepping HF generate until all are done: needed whenever the model's
    forward is a collective (ZeRO-3), or ranks whose rows hit EOS early would leave the others waiting
    forever. The static decoder runs on a gathered model, whose forward is not a collective."""
    eos_ids, pad_id = [tokenizer.eos_token_id], tokenizer.pad_token_id
    if decoder is not None:
        ids = decoder.generate(model, prompt_ids, prompt_mask, max_new_tokens=config.max_new_tokens,
                               sampling=sampling_of(config), eos_ids=eos_ids, pad_id=pad_id)
    else:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                             synced_gpus=synced_gpus)
        ids = out[:, prompt_ids.shape[1]:]
    if ids.shape[1] == 0:  # cannot happen with max_new_tokens >= 1; keep shapes valid anyway
        ids = torch.full((prompt_ids.shape[0], 1), tokenizer.eos_token_id, dtype=torch.long, device=prompt_ids.device)
    mask, has_eos = response_mask(ids, eos_ids, pad_id)
    ids = torch.where(mask.bool(), ids, pad_id)
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask, strict=True)]
    return Responses(ids=ids, mask=mask, has_eos=has_eos, texts=texts)
