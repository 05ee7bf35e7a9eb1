"""Everything distributed: ranks and device, DeepSpeed configs, PPO's engines, collectives, checkpoints.

The only modules of `rlhf` that import `torch.distributed` (`tests/unit/test_collectives.py` checks it) and
that build, configure or drive DeepSpeed; the one other import of `deepspeed` is preflight's look at its op
builders, which builds nothing. Both are imported inside functions, so stages and tests that run in a plain
process never load them. The submodules, each importing only those listed before it:

- `collectives`: sums, minima and maxima, broadcasts of tensors and objects, gradient averaging and
  parameter broadcast, gloo subgroups, the group's store; no-ops at world size 1 unless
  `RLHF_COLLECTIVES_ALWAYS=1`;
- `ranks`: launcher detection, ranks, the run's device and dtype, whether DeepSpeed is on, the process
  group's setup (`init_distributed`, `probe_links`), `barrier` and `cleanup`;
- `dsconfig`: the DeepSpeed config of a Trainer stage or of one PPO model, ZeRO's bucket sizes, the
  compiled optimizer ops a run would load, and the HF Trainer's arguments (`trainer_kwargs`);
- `training`: PPO's engines (`wrap`: a DeepSpeed engine or a `PlainEngine` with the same surface, with
  `MasterWeights` for a half-precision plain engine), `partitioned_loading`, `step_or_skip`, and what the
  loop reads of an engine;
- `checkpoints`: `save_engine`, `load_engine`, and `deepspeed_state_dict` behind the weights-only unpickler.

Two consumers:
- Trainer-based stages (SFT, reward, DPO, ORPO) call `trainer_kwargs()` for the TrainingArguments
  keys that put the HF Trainer on DeepSpeed (or plain torch) with the right backend.
- The PPO stage loads each ZeRO-3 model inside `partitioned_loading()` and wraps each of its models
  with `wrap()`, which builds the role's config (`role_config()`) and calls `initialize()` under DeepSpeed.

The rest of the package calls `engine.X`: the public names are re-exported here. The submodules call each
other through the module (`ranks.cuda_available()`), so a test that replaces a function does it on the
submodule that defines it (`monkeypatch.setattr(engine.ranks, "cuda_available", ...)`), where every caller
sees it; replacing `engine.X` reaches only the callers outside this package.
"""

from rlhf.engine.checkpoints import deepspeed_state_dict, load_engine, save_engine
from rlhf.engine.collectives import (
    COLLECTIVES_ALWAYS,
    all_gather_object,
    all_reduce,
    all_reduce_sum,
    any_rank,
    average_gradients,
    broadcast,
    broadcast_in,
    broadcast_object,
    broadcast_parameters,
    collective_device,
    store,
    subgroup,
)
from rlhf.engine.dsconfig import (
    SHM_COMM_OP,
    bucket_sizes,
    compiled_optimizer_ops,
    ds_config,
    hidden_size_of,
    model_hidden_size,
    offloads_optimizer,
    role_config,
    single_process_loading,
    skip_cpu_shm_comm,
    trainer_ds_config,
    trainer_kwargs,
    zero_section,
)
from rlhf.engine.ranks import (
    backend,
    barrier,
    cleanup,
    cuda_available,
    device,
    init_distributed,
    is_main,
    launched,
    local_rank,
    probe_links,
    rank,
    run_dtype,
    trained_load_dtype,
    usable_device,
    use_deepspeed,
    world_size,
)
from rlhf.engine.training import (
    AdamW,
    Engine,
    MasterWeights,
    PlainEngine,
    adapters_disabled,
    compute_device,
    constant_schedule,
    full_precision,
    full_state_dict,
    gathered_for_generation,
    grad_norm,
    initialize,
                                     is_zero3,
    local_numel,
    model_device,
    partitioned_loading,
    step_or_skip,
    trainer_device,
    wrap,
)

__all__ = [
    "COLLECTIVES_ALWAYS", "SHM_COMM_OP", "AdamW", "Engine", "MasterWeights", "PlainEngine",
    "adapters_disabled", "all_gather_object", "all_reduce", "all_reduce_sum", "any_rank", "average_gradients", "backend",
    "barrier", "broadcast", "broadcast_in", "broadcast_object", "broadcast_parameters", "bucket_sizes",
    "cleanup", "collective_device", "compiled_optimizer_ops", "compute_device", "constant_schedule",
    "cuda_available", "deepspeed_state_dict", "device", "ds_config", "full_precision", "full_state_dict",
    "gathered_for_generation", "grad_norm", "hidden_size_of", "init_distributed", "initialize", "is_main",
    "is_zero3", "launched", "load_engine", "local_numel", "local_rank", "model_device", "model_hidden_size",
    "offloads_optimizer", "partitioned_loading", "probe_links", "rank", "role_config", "run_dtype",
    "save_engine", "single_process_loading", "skip_cpu_shm_comm", "step_or_skip", "store", "subgroup",
    "trained_load_dtype", "trainer_device", "trainer_ds_config", "trainer_kwargs", "usable_device",
    "use_deepspeed", "wrap", "world_size", "zero_section",
]
