"""Model loading: aliases, local dirs and hub ids -> tokenizer, policy (causal LM), reward/critic (scalar head).

Every loader takes an alias (`smollm2-135m-instruct`, `tiny-random`), a local HF dir or a hub id, and
returns plain transformers objects (a peft `PeftModel` when LoRA is asked for). What they guarantee:

- pad != eos in every tokenizer, and `config.pad_token_id` / `generation_config.pad_token_id` of every
  model equal the tokenizer's pad id (why: `tokens`);
- embeddings are resized when the tokenizer grew (an added `<|pad|>` or ChatML tokens);
- only safetensors weights are read unless `allow_pickle` is set; pickle-only dirs are refused before
  anything is unpickled;
- a frozen reward model must really have a trained score head (checked from the safetensors header);
- outputs are written atomically (`save_pretrained_atomic`), LoRA merged into plain HF dirs.

The submodules, each importing only those listed before it:

- `files`: read a JSON object, remove a dir tree;
- `tokens`: chat template choice, pad != eos, model ids synced to the tokenizer;
- `cachelock`: one builder at a time per cache entry (flock, else an O_EXCL lock file with stale takeover);
- `aliases`: built-in names, built once under that lock into `cache_root()`;
- `resolve`: name -> dir, the checks that need no loading (`model_kind`, `check_weights`), and
  `fetch_model` (a model put on this machine before a launch);
- `lora`: the `model.lora` config -> peft LoraConfig, models wrapped with it;
- `streaming`: under ZeRO-3, a local checkpoint copied into the partitioned model one module at a time
  (rank 0 never holds the whole checkpoint);
- `loading`: `load_tokenizer`, `load_causal_lm`, `load_scalar_model`, `load_reward_stats`;
- `saving`: `save_pretrained_atomic`, `merge_adapter_dir`.

Heavy packages (torch, transformers, peft) are imported inside the functions that need them, so
`resolve_model`, `model_kind`, `check_weights` and `check_resolvable` stay cheap for preflight checks.
Failures a user can fix raise `ModelError` with one line naming the path or key and what to do.
"""

from rlhf.models.aliases import ALIASES, SMOLLM2_GGUF, Alias, cache_root
from rlhf.models.loading import load_causal_lm, load_reward_stats, load_scalar_model, load_tokenizer
from rlhf.models.lora import LORA_KEYS, lora_config, lora_dict
from rlhf.models.resolve import check_resolvable, check_weights, fetch_model, model_kind, resolve_model
from rlhf.models.saving import merge_adapter_dir, save_pretrained_atomic
from rlhf.models.tokens import ADDED_PAD, PAD_CANDIDATE
from rlhf.templates import CHATML_PATH

__all__ = [
    "ADDED_PAD", "ALIASES", "CHATML_PATH", "LORA_KEYS", "PAD_CANDIDATE", "SMOLLM2_GGUF", "Alias", "cache_root",
    "check_resolvable", "check_weights", "fetch_model", "load_causal_lm", "load_reward_stats", "load_scalar_model",
    "load_tokenizer", "lora_config", "lora_dict", "merge_adapter_dir", "model_kind", "resolve_model",
    "save_pretrained_atomic",
]
