"""The static-cache decoder (`rlhf.generation`) against HF generate on the tiny model, on CPU.

CUDA graphs need a GPU; what they replay is `StaticDecoder._decode_forward` on the same static buffers,
which these tests run eagerly. Equality with HF is exact here (same float32 maths on the same machine).
"""

from __future__ import annotations

import logging
import sys
import weakref

import pytest
import torch

from rlhf import generation, models
from rlhf.batching import encode_prompts
from rlhf.generation import Sampling, StaticDecoder, prefill_mask, warp_logits
from rlhf.ppo_math import response_mask

QUESTIONS = ["What is the capital of France?", "Hi", "Tell me a long story about penguins and the sea, please.",
             "Why?", "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    tok = models.load_tokenizer(str(tiny_model_dir), padding_side="left")
    model = models.load_causal_lm(str(tiny_model_dir), tokenizer=tok).eval()
    ids, mask = encode_prompts(tok, [[{"role": "user", "content": q}] for q in QUESTIONS], 32, "cpu")
    return tok, model, ids, mask


def _hf(model, tok, ids, mask, sampling: Sampling, max_new: int, eos: list[int]):
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=not sampling.greedy, temperature=sampling.temperature, top_k=sampling.top_k,
                              top_p=sampling.top_p, max_new_tokens=max_new, eos_token_id=eos,
                              pad_token_id=tok.pad_token_id, use_cache=True)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]


@pytest.mark.parametrize("sampling", [Sampling(greedy=True), Sampling(temperature=0.7, top_k=50, top_p=0.9),
                                      Sampling(temperature=1.3)], ids=["greedy", "top_k_top_p", "temperature"])
def test_same_tokens_as_hf_generate_for_the_same_seed(policy, sampling):
    tok, model, ids, mask = policy
    torch.manual_seed(7)
    hf = _hf(model, tok, ids, mask, sampling, 24, [tok.eos_token_id])
    torch.manual_seed(7)
    ours = StaticDecoder(32 + 24, use_graph=False).generate(model, ids, mask, max_new_tokens=24, sampling=sampling,
                                                            eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    assert torch.equal(ours, hf)


def test_rows_stop_at_eos_and_the_batch_ends_when_all_have(policy):
    tok, model, ids, mask = policy
    greedy = Sampling(greedy=True)
    free = StaticDecoder(64, use_graph=False).generate(model, ids, mask, max_new_tokens=12, sampling=greedy,
                                                       eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    # make the third token of row 0 and the first of every other row an "EOS"
    stops = sorted({int(free[0, 2])} | {int(t) for t in free[1:, 0]})
    decoder = StaticDecoder(64, use_graph=False)
    ours = decoder.generate(model, ids, mask, max_new_tokens=12, sampling=greedy, eos_ids=stops,
                            pad_id=tok.pad_token_id)
    assert torch.equal(ours, _hf(model, tok, ids, mask, greedy, 12, stops))
    first_stop = [next(i for i, t in enumerate(row.tolist()) if t in stops) for row in free]
    assert ours.shape[1] == max(first_stop) + 1 < 12  # ended when the last row stopped
    for row, at in zip(ours.tolist(), first_stop, strict=True):
        assert all(t == tok.pad_token_id for t in row[at + 1:])


def test_cache_is_reused_across_rollouts_and_prompt_lengths(policy):
    tok, model, ids, mask = policy
    decoder = StaticDecoder(64, use_graph=False)
    greedy = Sampling(greedy=True)
    first = decoder.generate(model, ids, mask, max_new_tokens=10, sampling=greedy, eos_ids=[tok.eos_token_id],
                             pad_id=tok.pad_token_id)
    cache = decoder.cache
    short_ids, short_mask = ids[:, -6:], mask[:, -6:]  # another (shorter) prompt width, same batch
    decoder.generate(model, short_ids, short_mask, max_new_tokens=10, sampling=greedy, eos_ids=[tok.eos_token_id],
                     pad_id=tok.pad_token_id)
    again = decoder.generate(model, ids, mask, max_new_tokens=10, sampling=greedy, eos_ids=[tok.eos_token_id],
                             pad_id=tok.pad_token_id)
    assert decoder.cache is cache  # reset in place, not reallocated
    assert torch.equal(again, first)
    with pytest.raises(ValueError, match="exceed the cache"):
        decoder.generate(model, ids, mask, max_new_tokens=64, sampling=greedy, eos_ids=[tok.eos_token_id],
                         pad_id=tok.pad_token_id)


def test_decode_logits_give_the_full_forward_log_probs(policy):
    # the cached one-token steps compute what one forward over prompt + response computes
    tok, model, ids, mask = policy
    decoder = StaticDecoder(64, use_graph=False)
    steps = []
    original = decoder._decode_forward
    decoder._decode_forward = lambda m: steps.append(original(m)) or steps[-1]
    response = decoder.generate(model, ids, mask, max_new_tokens=8, sampling=Sampling(temperature=1.0),
                                eos_ids=[-1], pad_id=tok.pad_token_id)
    full_ids = torch.cat([ids, response], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(response)], dim=1)
    pos = (full_mask.cumsum(dim=1) - 1).clamp_min(0)
    logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits.float()
    p = ids.shape[1]
    for t, step_logits in enumerate(steps):  # step t consumed response token t and predicts token t + 1
        expected = torch.log_softmax(logits[:, p + t], dim=-1)
        got = torch.log_softmax(step_logits.float(), dim=-1)
        assert torch.allclose(got, expected, atol=1e-4), t


def test_warping_matches_hf_processors():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    s = Sampling(temperature=0.8, top_k=40, top_p=0.85)
    expected = logits
    for warper in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(40), TopPLogitsWarper(0.85)):
        expected = warper(None, expected)
    assert torch.equal(warp_logits(logits, s), expected)


def test_prefill_mask_never_masks_a_whole_row():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    m = prefill_mask(mask, 6, torch.float32)
    allowed = m == 0
    assert allowed.shape == (2, 1, 4, 6) and allowed.any(dim=-1).all()
    assert allowed[0, 0, 3].tolist() == [False, False, True, True, False, False]  # real tokens only, causal
    assert allowed[0, 0, 0].tolist() == [True, False, False, False, False, False]  # padding sees itself


def test_generation_setting_picks_the_decoder():
    from rlhf.config import PPOCfg
    from rlhf.stages.ppo.experience import make_decoder

    static = make_decoder(PPOCfg(generation="static"), 32)
    assert isinstance(static, StaticDecoder) and not static.use_graph
    assert static.max_len == 32 + PPOCfg().max_new_tokens
    assert make_decoder(PPOCfg(generation="graph"), 32).use_graph
    assert make_decoder(PPOCfg(generation="auto"), 32) is None  # HF generate until graph is measured faster
    assert make_decoder(PPOCfg(generation="hf"), 32) is None


SAMPLED, GREEDY = Sampling(temperature=1.0), Sampling(greedy=True)


def _kwargs(tok, max_new: int, sampling: Sampling = GREEDY, eos: list[int] | None = None) -> dict:
    """`StaticDecoder.generate`'s keyword arguments (EOS: the tokenizer's unless given)."""
    return {"max_new_tokens": max_new, "sampling": sampling, "eos_ids": eos or [tok.eos_token_id],
            "pad_id": tok.pad_token_id}


def _failing_capture(monkeypatch, error: Exception) -> list[int]:
    """Make every CUDA-graph capture fail with `error` (its first call, the side stream, raises), as on a GPU
    where the decode step holds an op a graph cannot; returns the list of attempts."""
    attempts: list[int] = []

    def stream(*args, **kwargs):
        attempts.append(1)
        raise error

    monkeypatch.setattr(torch.cuda, "Stream", stream)
    return attempts


def test_a_failed_graph_capture_warns_once_with_its_reason_and_decodes_eagerly(policy, monkeypatch, caplog):
    tok, model, ids, mask = policy
    eager = StaticDecoder(64, use_graph=False).generate(model, ids, mask, **_kwargs(tok, 10))
    attempts = _failing_capture(monkeypatch, RuntimeError("CUDA error: operation not permitted when stream is "
                                                          "capturing\nCompile with TORCH_USE_CUDA_DSA ..."))
    decoder = StaticDecoder(64, use_graph=True)
    monkeypatch.setattr(decoder, "_buffers_on_gpu", lambda: True)  # as on a GPU
    with caplog.at_level(logging.DEBUG, logger="rlhf"):
        outs = [decoder.generate(model, ids, mask, **_kwargs(tok, 10)) for _ in range(3)]
        assert len(attempts) == 1  # the same batch and model would fail the same way: not tried per rollout
        decoder.generate(model, ids[:2], mask[:2], **_kwargs(tok, 10))  # another batch shape: worth a try
        assert len(attempts) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "(CUDA error: operation not permitted when stream is capturing)" in warnings[0]
    assert decoder.capture_error == "CUDA error: operation not permitted when stream is capturing"
    assert decoder.use_graph  # still asked for: a later batch shape may capture
    for out in outs:
        assert torch.equal(out, eager)


def test_a_capture_that_ran_out_of_memory_is_tried_again_next_rollout(policy, monkeypatch, caplog):
    tok, model, ids, mask = policy
    eager = StaticDecoder(64, use_graph=False).generate(model, ids, mask, **_kwargs(tok, 6))
    attempts = _failing_capture(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    decoder = StaticDecoder(64, use_graph=True)
    monkeypatch.setattr(decoder, "_buffers_on_gpu", lambda: True)
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        outs = [decoder.generate(model, ids, mask, **_kwargs(tok, 6)) for _ in range(3)]
    assert len(attempts) == 3  # the memory may be there at the next rollout
    assert [r.levelno for r in caplog.records] == [logging.WARNING]  # still one warning
    assert all(torch.equal(out, eager) for out in outs)


def test_release_frees_the_cache_and_the_next_rollout_allocates_it_again(policy):
    tok, model, ids, mask = policy
    decoder = StaticDecoder(64, use_graph=False)
    first = decoder.generate(model, ids, mask, **_kwargs(tok, 10))
    layer = decoder.cache.layers[0]
    keys, ids_buf = weakref.ref(layer.keys), weakref.ref(decoder._bufs["ids"])
    del layer
    decoder.release()
    assert decoder.cache is None and decoder._bufs == {} and decoder._graph is None
    assert keys() is None and ids_buf() is None  # nothing else holds them: the memory is free
    again = decoder.generate(model, ids, mask, **_kwargs(tok, 10))
    assert decoder.cache is not None and torch.equal(again, first)


def _host_reads(monkeypatch) -> list[str]:
    """Record every read of a tensor's value onto the host (a device sync on a GPU) that generation.py makes."""
    reads: list[str] = []
    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, _real=real, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == generation.__file__:
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return reads


def _rollouts(decoder, model, ids, mask, kwargs, seed: int = 11):
    """Two rollouts in a row from one seed, with the generator's state after them."""
    torch.manual_seed(seed)
    first = decoder.generate(model, ids, mask, **kwargs)
    second = decoder.generate(model, ids, mask, **kwargs)
    return first, second, torch.get_rng_state()


@pytest.mark.parametrize(("sampling", "ends"), [
    (SAMPLED, [2, 5, 10, 7, 3]), (SAMPLED, [0, 3, 1, 2, 0]), (SAMPLED, [12, 17, 9, 16, 11]), (SAMPLED, None),
    (GREEDY, [0] * 5), (GREEDY, None),  # the tiny random model repeats one token greedily: all end together
], ids=["rows_end_at_2_to_10", "all_end_before_the_first_check", "rows_end_at_9_to_17", "sampled_no_end",
        "greedy_all_end_at_once", "greedy_no_end"])
def test_checking_for_the_end_every_few_tokens_changes_nothing(policy, monkeypatch, sampling, ends):
    tok, model, ids, mask = policy
    torch.manual_seed(11)
    free = StaticDecoder(64, use_graph=False).generate(model, ids, mask, **_kwargs(tok, 20, sampling, [-1]))
    # "EOS" ids that end row r at step ends[r] (or earlier, where the row drew another row's "EOS" first)
    eos = [-1] if ends is None else sorted({int(free[r, at]) for r, at in enumerate(ends)})
    kwargs = _kwargs(tok, 20, sampling, eos)
    monkeypatch.setattr(generation, "DONE_CHECK_EVERY", 1)  # the reference: a host check after every token
    every_token = _rollouts(StaticDecoder(64, use_graph=False), model, ids, mask, kwargs)
    monkeypatch.setattr(generation, "DONE_CHECK_EVERY", 8)
    reads = _host_reads(monkeypatch)
    every_8 = _rollouts(StaticDecoder(64, use_graph=False), model, ids, mask, kwargs)
    monkeypatch.undo()
    for ours, ref in zip(every_8[:2], every_token[:2], strict=True):
        assert torch.equal(ours, ref)
        for got, want in zip(response_mask(ours, eos, tok.pad_token_id), response_mask(ref, eos, tok.pad_token_id),
                             strict=True):
            assert torch.equal(got, want)  # mask and has_eos
    assert torch.equal(every_8[2], every_token[2])  # the generator left where per-token checks leave it
    length = every_token[0].shape[1]
    if ends is None:
        assert length == 20
    else:  # the batch ended when its last row did, before max_new_tokens
        ended = [next(i for i, t in enumerate(row.tolist()) if t in eos) for row in every_token[0]]
        assert length == max(ended) + 1 < 20
        assert len(set(ended)) > 1 or sampling.greedy  # rows ended at different steps
    # a host read per 8 tokens, and two at the end, instead of one per token (2 rollouts)
    assert len(reads) <= 2 * (length // 8 + 2)
