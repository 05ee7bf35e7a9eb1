"""Writing models: a complete HF dir in one rename, and a LoRA adapter dir merged into a plain model."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from rlhf.models.files import read_json, rmtree, umask_modes
from rlhf.models.loading import load_causal_lm, load_scalar_model, load_tokenizer


def _replace_dir(src: Path, dst: Path) -> None:
    """Move `src` to `dst`; an existing `dst` is first renamed aside, so `dst` is never half-written."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
    rmtree(old)
    os.replace(dst, old)
    os.replace(src, dst)
    rmtree(old)


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
    written as `<out_dir>.tmp-<pid>` and renamed; an existing `out_dir` is replaced; its files get the
    umask's mode (`umask_modes`). Call on one rank.
    """
    out = Path(out_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    rmtree(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _plain_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file_name, text in (extra_files or {}).items():
            if Path(file_name).name != file_name:
                raise ValueError(f"extra_files: {file_name!r} must be a plain file name")
            (tmp / file_name).write_text(text, encoding="utf-8")
        umask_modes(tmp)  # safetensors writes the weights 0600
        _replace_dir(tmp, out)
    finally:
        rmtree(tmp)
    return out


def merge_adapter_dir(adapter_dir: str | Path, base: str, *, tokenizer=None, trust_remote_code: bool = False,
                      allow_pickle: bool = False) -> Path:
    """Turn a peft adapter dir (as `Trainer.save_model` writes it) into a merged full model, in place.

    The base is loaded with the adapter dir's own tokenizer when it has one (so resized vocabularies
    match); SEQ_CLS adapters merge into a scalar model. Adapter files are removed; other files stay.
    """
    from peft import PeftModel

    out = Path(adapter_dir)
    task = read_json(out / "adapter_config.json").get("task_type")
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
