"""What a model name points to, and what can be told about it without loading it.

A name is an alias (built into the cache on first use), a local dir, or a hub id. `model_kind`,
`check_weights` and `check_resolvable` read only config files and file names, so preflight can call
them before anything heavy is imported. `fetch_model` puts a model on this machine ahead of a launch
(`rlhf fetch`), so that ranks find it there instead of all building or downloading it at once.
"""

from __future__ import annotations

import re
from pathlib import Path

from rlhf.errors import ModelError
from rlhf.models.aliases import ALIASES, cache_root, is_built, materialize
from rlhf.models.files import read_json

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
# Hub files the loaders never read: other frameworks' weights and GGUF/ONNX exports (pickle weights too,
# unless allowed). Everything else comes: configs, safetensors, tokenizer files, remote code.
_HUB_SKIP = ["*.h5", "*.msgpack", "*.ot", "*.tflite", "*.onnx", "*.onnx_data", "*.gguf", "*.mlmodel", "*.npz"]
_HUB_TOKENIZER = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]  # no weights


def _looks_local(name: str) -> bool:
    """True for names a user meant as a path: ./x, /x, ~/x, a/b/c, or a/b whose `a` exists here."""
    if name.startswith((".", "/", "~")) or "\\" in name or not _HUB_ID.match(name):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).exists()


def resolve_model(name_or_path: str) -> str:
    """Alias -> its cache dir (built once); local dir -> itself (validated); hub id -> unchanged."""
    name = str(name_or_path)
    if name in ALIASES:
        return str(materialize(name))
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


def model_kind(path: str) -> str:
    """"causal_lm" | "sequence_classification" | "lora_adapter" | "unknown" for a local dir (hub id: "unknown")."""
    model_dir = Path(path).expanduser()
    if (model_dir / "adapter_config.json").is_file():
        return "lora_adapter"
    if not (model_dir / "config.json").is_file():
        return "unknown"
    architectures = read_json(model_dir / "config.json").get("architectures") or []
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


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_resolvable(name_or_path: str, *, allow_pickle: bool = False) -> str | None:
    """Preflight: the one-line problem that would stop loading `name_or_path`, or None. Builds nothing."""
    try:
        if name_or_path in ALIASES:
            if not is_built(cache_root() / "models" / name_or_path):
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


def fetch_model(name_or_path: str, *, allow_pickle: bool = False, tokenizer_only: bool = False) -> str:
    """Put `name_or_path` on this machine and say where it is: an alias is built into the cache (once; see
    `aliases`), a local dir is checked, a hub id is downloaded into the Hugging Face cache (files already
    there are kept; with `tokenizer_only`, no weights) unless the Hub is offline, when its cached copy must
    exist. Raises ModelError (one line)."""
    resolved = resolve_model(name_or_path)
    if Path(resolved).is_dir():
        if not tokenizer_only:
            check_weights(resolved, allow_pickle)
        return resolved
    problem = check_resolvable(resolved, allow_pickle=allow_pickle) if _hub_offline() else None
    if problem:
        raise ModelError(problem)
    from huggingface_hub import snapshot_download

    skip = _HUB_SKIP if allow_pickle else [*_HUB_SKIP, *(f"*{suffix}" for suffix in sorted(_PICKLE_SUFFIXES))]
    try:
        return snapshot_download(resolved, ignore_patterns=skip,
                                 allow_patterns=_HUB_TOKENIZER if tokenizer_only else None)
    except Exception as err:  # network, auth, unknown repo: one line with the reason, as the loaders give
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"{resolved}: cannot download it from the Hugging Face Hub ({reason}); check the id and "
                         f"your access, or use a local model dir or an alias ({', '.join(ALIASES)})") from None
