"""The static-cache decoder (`rlhf.generation`) against HF generate on the tiny model, on CPU.

CUDA graphs need a GPU; what they replay is `StaticDecoder._decode_forward` on the same static buffers,
which these tests run eagerly. Equality with HF is exact here (same float32 maths on the same machine).
"""

from __future__ import annotations

import pytest
import torch

from rlhf import models
from rlhf.batching import encode_prompts
from rlhf.generation import Sampling, StaticDecoder, prefill_mask, warp_logits

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

    static = make_decoder(PPOCfg(generation="static"), 32, "cpu")
    assert isinstance(static, StaticDecoder) and not static.use_graph
    assert static.max_len == 32 + PPOCfg().max_new_tokens
    assert make_decoder(PPOCfg(generation="graph"), 32, torch.device("cuda", 0)).use_graph
    for device in ("cpu", torch.device("cuda", 0)):  # auto: HF generate until graph is measured faster
        assert make_decoder(PPOCfg(generation="auto"), 32, device) is None
        assert make_decoder(PPOCfg(generation="hf"), 32, device) is None
