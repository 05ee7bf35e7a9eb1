"""`models.streaming`: a checkpoint copied into an already-built model tensor by tensor, as the ZeRO-3 loader
does on rank 0 (here in one process, where the gathering is a no-op), gives exactly what `from_pretrained`
gives, maps a causal LM's weights into a scalar-head model, and refuses or reports a head of another shape.

The 2-rank ZeRO-3 runs (tests/distributed/test_ppo_zero3_models.py) check that rank 0 never reads the
whole checkpoint there and that every rank ends with the checkpoint's values."""

from __future__ import annotations

import pytest
import torch

from rlhf.errors import ModelError
from rlhf.models import streaming


def _built(auto_class, model_dir, **config_kwargs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, **config_kwargs)
    torch.manual_seed(123)  # random weights that the copy must overwrite
    return auto_class.from_config(config, dtype=torch.float32)


def _same_state(a, b) -> list[str]:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_a_streamed_model_equals_from_pretrained(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = _built(AutoModelForCausalLM, tiny_model_dir)
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert _same_state(model, expected)  # the random start differs from the checkpoint
    info = streaming.stream_into(model, tiny_model_dir)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert _same_state(model, expected) == []


def test_a_causal_lm_into_a_scalar_model_misses_only_the_head(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    critic = _built(AutoModelForSequenceClassification, tiny_model_dir, num_labels=1)
    head_before = critic.score.weight.clone()
    info = streaming.stream_into(critic, tiny_model_dir)
    assert info["missing_keys"] == ["score.weight"]
    assert info["mismatched_keys"] == []
    assert torch.equal(critic.score.weight, head_before)  # left as initialised
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    backbone = lm.model.state_dict()
    assert all(torch.equal(v, backbone[k]) for k, v in critic.model.state_dict().items())


def test_a_head_of_another_shape_is_refused_or_reported(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    two = _built(AutoModelForSequenceClassification, tiny_model_dir, num_labels=2)
    two.save_pretrained(tmp_path)
    one = _built(AutoModelForSequenceClassification, tmp_path, num_labels=1)
    with pytest.raises(ModelError, match=r"score.weight has shape \[2, 64\] in the checkpoint but \[1, 64\]"):
        streaming.stream_into(one, tmp_path)
    info = streaming.stream_into(one, tmp_path, ignore_mismatched_sizes=True)
    assert info["mismatched_keys"] == ["score.weight"] and info["missing_keys"] == []
    assert torch.equal(one.model.embed_tokens.weight, two.model.embed_tokens.weight)


def test_weights_stream_only_under_a_zero3_config(tiny_model_dir, tmp_path):
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    assert not streaming.streamable(str(tiny_model_dir))
    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert streaming.streamable(str(tiny_model_dir))
        assert not streaming.streamable(str(tmp_path))  # no safetensors: transformers' own loading
        assert not streaming.streamable("some-org/some-model")  # a hub id: transformers' own loading
    finally:
        unset_hf_deepspeed_config()
        del registered


def test_tied_embeddings_load_once_and_stay_tied(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=True)
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)  # saves the embeddings once
    model = _built(AutoModelForCausalLM, tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    info = streaming.stream_into(model, tmp_path)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    expected = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert _same_state(model, expected) == [] and model.lm_head.weight is model.model.embed_tokens.weight
