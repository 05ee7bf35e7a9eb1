"""Loaders: a name -> tokenizer, causal LM (policy) or scalar-head model (reward model, critic).

Each loader resolves the name (`resolve.resolve_model`), refuses pickle-only dirs, loads with
transformers, turns its missing-weight report into one ModelError line, syncs pad/eos ids and resizes
the embeddings to the tokenizer (`tokens`), and wraps the model with LoRA when asked. A frozen reward
model must hold a trained 1-output score head, checked from the safetensors header before loading.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlhf import templates
from rlhf.errors import ModelError
from rlhf.models import streaming
from rlhf.models.aliases import ALIASES
from rlhf.models.files import read_json
from rlhf.models.lora import wrap_lora
from rlhf.models.resolve import check_weights, model_kind, resolve_model
from rlhf.models.tokens import ensure_distinct_pad, sync_special_ids, template_text, use_chatml_tokens

log = logging.getLogger(__name__)

_HEAD_KEY = re.compile(r"(^|\.)(score|classifier)\.")


def _load_error(name: str, what: str, err: BaseException) -> ModelError:
    """One line for a failed from_pretrained: local dir -> the reason; hub id -> offline/unknown + what to do."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if "custom code" in reason or "trust_remote_code" in reason:
        return ModelError(f"{name}: the {what} needs the Python code shipped with it (auto_map), which is not run "
                          "by default; read that code, and only if you trust it set model.trust_remote_code: true")
    if Path(name).expanduser().is_dir():
        return ModelError(f"{name}: cannot load the {what} ({reason}); check that the dir is complete")
    if "connect" in reason or "offline" in reason.lower():
        reason = "the Hub is offline or unreachable"
    return ModelError(f"{name}: cannot load the {what} from the Hugging Face Hub ({reason}); no local dir of "
                      f"that name exists: use a local model dir or an alias ({', '.join(ALIASES)})")


def load_tokenizer(path: str, *, trust_remote_code: bool = False, chat_template: str | None = None,
                   padding_side: str = "right"):
    """Tokenizer with pad != eos and a chat template.

    chat_template: None keeps the tokenizer's own (ChatML from templates/chatml.jinja if it has none);
    "chatml" forces ChatML; a .jinja path (or inline Jinja) sets that. Setting ChatML makes `<|im_end|>`
    the EOS (added if missing). The tokenizer may grow by a few tokens; `load_causal_lm` and
    `load_scalar_model` resize embeddings whenever `len(tokenizer)` exceeds them.
    """
    from transformers import AutoTokenizer

    name = resolve_model(str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _load_error(name, "tokenizer", err) from err
    text = template_text(tokenizer, chat_template)
    if text is not None:
        tokenizer.chat_template = text
        if text == templates.chatml():
            use_chatml_tokens(tokenizer)
    ensure_distinct_pad(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


def _torch_dtype(dtype: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelError(f"model.dtype: unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Drop transformers' LOAD REPORT table; `_check_loading_info` turns what matters into one line.

    A filter, not a higher level: transformers runs (and logs) its tensor-parallel plan check whenever
    this logger's level is WARNING or above.
    """
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_drop_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_drop_load_report)


def _safetensors_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the headers of every *.safetensors file (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, list[int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="numpy") as handle:
                shapes.update({key: list(handle.get_slice(key).get_shape()) for key in handle.keys()})
        except (SafetensorError, OSError) as err:
            raise ModelError(f"{file}: not a readable safetensors file ({err}); re-save the model") from err
    return shapes


def _not_reward_model(path: str, why: str) -> ModelError:
    return ModelError(f"{path}: not a reward model ({why}); train one with `rlhf reward` "
                      "or point to a reward-model dir")


def _require_score_head(model_dir: Path) -> None:
    """Before loading: the checkpoint must hold a 1-output `score`/`classifier` head."""
    kind = model_kind(str(model_dir))
    if kind == "causal_lm":
        raise _not_reward_model(str(model_dir), "it is a causal LM with no trained score head")
    if kind == "lora_adapter":
        raise _not_reward_model(str(model_dir), "it is a LoRA adapter dir; save the merged model")
    head = {k: s for k, s in _safetensors_shapes(model_dir).items() if _HEAD_KEY.search(k)}
    if not head:
        raise _not_reward_model(str(model_dir), "its weights have no score head")
    outputs = [s[0] for k, s in head.items() if k.endswith(("score.weight", "classifier.weight", "out_proj.weight"))]
    if outputs and outputs[0] != 1:
        raise ModelError(f"{model_dir}: the score head has {outputs[0]} outputs but a reward model needs 1 "
                         "(num_labels=1); train one with `rlhf reward`")


def _check_loading_info(name: str, info: dict, *, head_ok_missing: bool) -> None:
    """Missing weights are an error (except a fresh score head when allowed); unused ones are logged."""
    missing = set(info.get("missing_keys") or ())
    head = {k for k in missing if _HEAD_KEY.search(k)}
    if head and not head_ok_missing:
        raise _not_reward_model(name, f"the checkpoint has no trained score head: {sorted(head)[0]} missing")
    backbone = sorted(missing - head)
    if backbone:
        raise ModelError(f"{name}: the checkpoint lacks {len(backbone)} weights (e.g. {backbone[0]}); it does not "
                         "match its config.json architecture; re-save the model")
    unused = sorted(info.get("unexpected_keys") or ())
    if unused:
        log.info("%s: ignored %d checkpoint weights this model does not use (e.g. %s)", name, len(unused), unused[0])


def _load_kwargs(trust_remote_code: bool, allow_pickle: bool, dtype: str) -> dict[str, Any]:
    # use_safetensors=None lets transformers fall back to .bin only when pickle is allowed.
    return {"dtype": _torch_dtype(dtype), "trust_remote_code": trust_remote_code,
            "use_safetensors": None if allow_pickle else True, "output_loading_info": True}


def _from_pretrained(auto_class, name: str, kwargs: dict, **extra):
    """(model, loading report) from `auto_class.from_pretrained`; under a registered ZeRO-3 config, from a
    local safetensors dir streamed one module at a time (`streaming`), so rank 0 never holds the whole
    checkpoint."""
    if streaming.streamable(name):
        return streaming.load_streamed(auto_class, name, dtype=kwargs["dtype"],
                                       trust_remote_code=kwargs["trust_remote_code"], **extra)
    return auto_class.from_pretrained(name, **extra, **kwargs)


def load_causal_lm(path: str, *, tokenizer=None, trust_remote_code: bool = False, allow_pickle: bool = False,
                   dtype: str = "float32", lora: dict | None = None):
    """AutoModelForCausalLM from an alias/dir/hub id, pad ids synced, embeddings resized, optional LoRA.

    The train/eval mode and dropout are left as transformers sets them (callers decide).
    """
    from transformers import AutoModelForCausalLM

    name = resolve_model(str(path))
    check_weights(name, allow_pickle)
    if model_kind(name) == "sequence_classification":
        raise ModelError(f"{name}: is a sequence-classification (reward) model, not a causal LM; point to a "
                         "causal-LM dir such as the sft stage output")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name, trust_remote_code=trust_remote_code)
    try:
        with _quiet_load_report():
            model, info = _from_pretrained(AutoModelForCausalLM, name,
                                           _load_kwargs(trust_remote_code, allow_pickle, dtype))
    except (OSError, ValueError) as err:
        raise _load_error(name, "model", err) from err
    _check_loading_info(name, info, head_ok_missing=False)
    sync_special_ids(model, tokenizer)
    return wrap_lora(model, lora, "CAUSAL_LM") if lora else model


def load_scalar_model(path: str, *, tokenizer=None, require_head: bool, trust_remote_code: bool = False,
                      allow_pickle: bool = False, dtype: str = "float32", lora: dict | None = None):
    """AutoModelForSequenceClassification with num_labels=1 (reward model or critic).

    require_head=True (a frozen reward model): the checkpoint must already hold a trained 1-output head,
    checked from the safetensors header before loading and again from transformers' missing keys.
    require_head=False (critic or reward training from an LM): a missing head is freshly initialized,
    without transformers' "score.weight MISSING" report; an existing 1-output head is kept.
    """
    from transformers import AutoModelForSequenceClassification

    name = resolve_model(str(path))
    check_weights(name, allow_pickle)
    if require_head and Path(name).is_dir():
        _require_score_head(Path(name))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(name, trust_remote_code=trust_remote_code)
    try:
        with _quiet_load_report():
            model, info = _from_pretrained(AutoModelForSequenceClassification, name,
                                           _load_kwargs(trust_remote_code, allow_pickle, dtype),
                                           num_labels=1, ignore_mismatched_sizes=not require_head)
    except (OSError, ValueError) as err:
        raise _load_error(name, "model", err) from err
    if info.get("mismatched_keys"):
        log.info("%s: score head re-initialized with 1 output (the checkpoint's had another size)", name)
    _check_loading_info(name, info, head_ok_missing=not require_head)
    sync_special_ids(model, tokenizer)
    return wrap_lora(model, lora, "SEQ_CLS") if lora else model


def load_reward_stats(path: str | Path) -> dict | None:
    """`DIR/reward_stats.json` as {"mean": float, "std": float, "n": int}, or None when absent."""
    file = Path(path) / "reward_stats.json"
    if not file.is_file():
        return None
    data = read_json(file)
    try:
        stats = {"mean": float(data["mean"]), "std": float(data["std"]), "n": int(data["n"])}
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{file}: needs numbers for keys mean, std and n ({err!r}); re-run `rlhf reward`") from err
    if not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and stats["std"] >= 0):
        raise ModelError(f"{file}: mean and std must be finite and std >= 0; re-run `rlhf reward`")
    return stats
