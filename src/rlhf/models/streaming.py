"""A local safetensors checkpoint into a model that DeepSpeed's ZeRO-3 has already partitioned, one module
at a time.

transformers' own ZeRO-3 load reads the whole checkpoint on rank 0 (`load_state_dict` of every shard file,
then one module's parameters gathered at a time): for a moment rank 0 holds a full copy of the model's
tensors beside its shards, the largest transient of a ZeRO-3 start (an 8B float32 checkpoint is 32 GB on
rank 0 of each job). Here the model is built partitioned with random weights (`from_config` under
zero.Init), then each module's own parameters are gathered, rank 0 reads exactly those tensors from the
files, copies them in, and the module is partitioned again before the next one. Rank 0 then holds its
shards, one gathered module and one tensor as read; the other ranks never read a weight.

The result is what `from_pretrained` gives under ZeRO-3: the checkpoint's values in the model's dtype,
the base-model prefix added where the checkpoint lacks it (a causal LM's weights into a scalar-head model),
and a `{missing_keys, unexpected_keys, mismatched_keys}` report. Collective: every rank calls it.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.errors import ModelError


def checkpoint_index(model_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (its file, its shape), from the headers of every *.safetensors file (no data read)."""
    from safetensors import SafetensorError, safe_open

    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    index[key] = (file, tuple(handle.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as err:
            raise ModelError(f"{file}: not a readable safetensors file ({err}); re-save the model") from err
    return index


def read_tensor(file: Path, key: str):
    """One tensor, read on its own: the file is mapped only while this tensor is copied out of it."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(key)


def _full_shape(param) -> tuple[int, ...]:
    """A parameter's shape as the checkpoint stores it (a ZeRO-3 partition keeps it in `ds_shape`)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def _checkpoint_key(name: str, index: dict, prefix: str) -> str | None:
    """The checkpoint's name for the model's tensor `name`: the same, or without the base-model prefix."""
    if name in index:
        return name
    if prefix and name.startswith(prefix + "."):
        bare = name[len(prefix) + 1:]
        return bare if bare in index else None
    return None


def _assign(model, index: dict, model_dir: Path, ignore_mismatched_sizes: bool):
    """Each module's own parameters paired with their checkpoint keys, module by module, and the report.
    Tied parameters (lm_head and the embeddings) are assigned once."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    seen: set[int] = set()
    used: set[str] = set()
    report: dict[str, list[str]] = {"missing_keys": [], "mismatched_keys": []}
    plan = []
    for module_name, module in model.named_modules():
        todo = []
        for local, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{local}" if module_name else local
            key = _checkpoint_key(name, index, prefix)
            used.update([key] if key is not None else [])
            if id(param) in seen:
                continue
            seen.add(id(param))
            if key is None:
                report["missing_keys"].append(name)
            elif index[key][1] == _full_shape(param):
                todo.append((param, key))
            elif ignore_mismatched_sizes:
                report["mismatched_keys"].append(name)
            else:
                raise ModelError(f"{model_dir}: {key} has shape {list(index[key][1])} in the checkpoint but "
                                 f"{list(_full_shape(param))} in the model; re-save the model")
        buffers = [(buffer, key) for local, buffer in module.named_buffers(recurse=False)
                   if buffer is not None and (key := _checkpoint_key(f"{module_name}.{local}" if module_name
                                                                     else local, index, prefix)) is not None]
        used.update(key for _, key in buffers)
        plan.append((todo, buffers))
    report["unexpected_keys"] = sorted(set(index) - used)
    return plan, report


def stream_into(model, model_dir: Path, *, ignore_mismatched_sizes: bool = False) -> dict:
    """Copy the checkpoint in `model_dir` into the ZeRO-3-partitioned `model`, module by module (above).

    A parameter whose checkpoint shape differs is an error, or with `ignore_mismatched_sizes` is left as
    initialised and reported in `mismatched_keys`. Persistent buffers in the checkpoint are read by every
    rank (ZeRO-3 does not partition buffers; they are small). Parameters that are not partitioned (one
    process, no ZeRO-3) are simply copied into."""
    import deepspeed
    import torch
    from deepspeed import comm

    index = checkpoint_index(model_dir)
    plan, report = _assign(model, index, model_dir, ignore_mismatched_sizes)
    # DeepSpeed's own rank, as its gathering uses (zero.Init has started its comm); none in one process
    reader = not comm.is_initialized() or comm.get_rank() == 0
    with torch.no_grad():
        for todo, buffers in plan:
            if todo:
                with deepspeed.zero.GatheredParameters([param for param, _ in todo], modifier_rank=0):
                    for param, key in todo if reader else ():
                        param.copy_(read_tensor(index[key][0], key))
            for buffer, key in buffers:
                buffer.copy_(read_tensor(index[key][0], key))
    return {key: report[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}


def streamable(name: str) -> bool:
    """Whether `name` can be streamed: a local dir of safetensors weights, loaded while a ZeRO-3 DeepSpeed
    config is registered for transformers (inside `engine.partitioned_loading` or a Trainer's arguments)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    model_dir = Path(name)
    return is_deepspeed_zero3_enabled() and model_dir.is_dir() and any(model_dir.glob("*.safetensors"))


def load_streamed(auto_class, name: str, *, dtype, trust_remote_code: bool, ignore_mismatched_sizes: bool = False,
                  **config_kwargs):
    """(model, loading report) as `auto_class.from_pretrained(name, ..., output_loading_info=True)` gives
    under ZeRO-3, built partitioned and filled by `stream_into`. In eval mode, as from_pretrained leaves it."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, **config_kwargs)
    model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    info = stream_into(model, Path(name), ignore_mismatched_sizes=ignore_mismatched_sizes)
    if model.can_generate() and (Path(name) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(name)
    model.config.name_or_path = name
    return model.eval(), info
