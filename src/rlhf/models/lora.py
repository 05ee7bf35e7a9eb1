"""LoRA: the `model.lora` config as a peft LoraConfig, and a model wrapped with it."""

from __future__ import annotations

from rlhf.errors import ModelError

LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


def peft_config(lora: dict, task_type: str):
    """{"r", "alpha", "dropout", "target_modules": "all-linear" | [names]} -> peft LoraConfig."""
    from peft import LoraConfig

    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ModelError(f"model.lora.{unknown[0]}: unknown key; use {', '.join(LORA_KEYS)}")
    return LoraConfig(r=int(lora.get("r", 16)), lora_alpha=lora.get("alpha", 32),
                      lora_dropout=float(lora.get("dropout", 0.0)),
                      target_modules=lora.get("target_modules", "all-linear"), task_type=task_type)


def wrap_lora(model, lora: dict, task_type: str):
    """`model` as a peft PeftModel with fresh LoRA adapters; ModelError when no target module matches."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config(lora, task_type))
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
    return None if lora is None else peft_config(lora, task_type)
