"""`models.streaming`: a checkpoint copied into an already-built model tensor by tensor, as the ZeRO-3 loader
does on rank 0 (here in one process, where the gathering is a no-op), gives exactly what `from_pretrained`
gives, maps a causal LM's weights into a scalar-head model, and refuses or reports a head of another shape.

Under a real ZeRO-3 config (one rank in a gloo group) no whole checkpoint is read and the gathered weights
are the file's; the 2-rank PPO runs under ZeRO-3 (tests/distributed/) load every model this way."""

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


def test_under_zero3_no_rank_reads_the_whole_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """A ZeRO-3 load (`engine.partitioned_loading`, one rank in a gloo group) builds the model partitioned
    and streams the weights in: transformers' whole-checkpoint reader (`load_state_dict`, which rank 0 of
    its own ZeRO-3 loading runs over every file) is never called, and the gathered weights are the file's."""
    import torch.distributed as dist
    import transformers.modeling_utils as modeling_utils
    from safetensors.torch import load_file

    from rlhf import engine, models
    from rlhf.config import DeepSpeedCfg

    def whole_read(*args, **kwargs):
        raise AssertionError("the whole checkpoint was read at once")

    monkeypatch.setattr(modeling_utils, "load_state_dict", whole_read)
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        import deepspeed

        deepspeed.comm.init_distributed(dist_backend="gloo")
        ds = DeepSpeedCfg(enabled=True, zero_stage=3)
        with engine.partitioned_loading(ds, "ref", train=False, micro_batch=1, grad_accum=1, dtype="float32"):
            model = models.load_causal_lm(str(tiny_model_dir))
        params = list(model.parameters())
        assert all(hasattr(p, "ds_id") for p in params)  # partitioned by zero.Init
        with deepspeed.zero.GatheredParameters(params):
            state = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(torch.equal(state[k], saved[k]) for k in saved)
