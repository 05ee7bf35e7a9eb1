"""`rlhf plan`: per-GPU memory of every model of a config's final stage, and the cheapest ZeRO settings that fit.

No weights are loaded. Parameter counts come from the model's `config.json`: the model is built on
PyTorch's `meta` device (shapes only), as a causal LM for actor/reference/policy and as a 1-label
sequence classifier for critic/reward, so tied embeddings, biases and heads are counted exactly. With
LoRA the meta models are wrapped by peft with the config's `model.lora` (rank, target modules), as the
stages wrap them, which gives the parameters each model holds (base, adapters, and a classifier's
trained copy of its score head) and the ones it trains (adapters, plus that head for a critic or reward
model). `config.json` is found by resolving the name (aliases such as `tiny-random` are built once, a
local dir is read), then in the local Hugging Face cache; a hub id with neither (offline) uses
`KNOWN_ARCHS`. The policy's architecture is `model.name_or_path`'s; the reward model's (and a critic
initialised from it) is that of the reward stage's output when it exists, else `reward.base_model`'s,
else the policy's (the reward stage then starts from the SFT output or the base model).

The memory model, per GPU, with N = gpus x nodes ranks, b = bytes per weight of `model.dtype`, P the
parameters a model holds and T the ones it trains (T = P, or adapters (+ head) with LoRA):

  trained model (actor, critic, SFT/RM/DPO/ORPO policy)    frozen model (reference, reward)
    weights  P*b, /N under ZeRO-3, on CPU with offload_param     weights  P*b, /N under ZeRO-3 (ZeRO-1/2
    grads    T*b, /N under ZeRO-2/3 (CPU with offload_optimizer)          have nothing to shard without
    master   4T fp32 copy (DeepSpeed keeps one at ZeRO >= 1, and          an optimizer: stage 0)
             for 16-bit weights at any stage), /N at ZeRO >= 1
    adam     8T (m and v in fp32), /N at ZeRO >= 1; master and adam on CPU with offload_optimizer

plus activations. Training: per layer mb*T*H*34 bytes at 16 bits (Korthikanti et al. 2022,
https://arxiv.org/abs/2205.05198, eq. 2 with flash/SDPA attention, so no a*s^2 term), scaled by b/2;
with gradient checkpointing (`gradient_checkpointing` of the Trainer stages; PPO has none) one stored
input per layer plus one full layer. LoRA keeps the same activations (the adapters need every adapted
layer's input, and the backward still runs through the frozen layers) plus rank-r ones, left out. LM
logits cost mb*T*V*4*2 (fp32 logits and their log-softmax). Inference keeps one layer's working set.
PPO rollouts add the KV cache (2*L*kv_heads*head_dim*B*T*b, B = `ppo.rollout_rows`: every prompt's
`samples_per_prompt` responses) and, under ZeRO-3, the actor's full gathered weights (the rollout gathers
them once, `engine.gathered_for_generation`). ZeRO-3 models also hold about two gathered layers (prefetch).

DeepSpeed's buffers, sized from each model's hidden size H as the package sets them (`engine.bucket_sizes`)
and allocated in the weights' dtype: a trained model at ZeRO >= 1 keeps a gradient reduce bucket of H^2
elements, and a ZeRO-3 model (trained or not) prefetches up to 0.9*H^2 elements of parameters. ZeRO-1/2's
all-gather bucket is only a chunk size (it gathers into the flat weights in place): no memory.

A GPU counts as fitting when the peak is under 92% of its memory less 1 GiB (CONTEXT_RESERVE_GIB): the
CUDA context, NCCL's own buffers, cuBLAS workspaces and fragmentation, none of which the estimate holds.

Phases of PPO do not overlap, so the peak is the model states of all four models plus the largest of:
rollout (gathered actor + KV cache), experience (the largest inference forward of the four models at
micro-batch), update (the actor's or the critic's training activations, each on its own architecture).
A critic-free `ppo.advantage` (grpo, dr_grpo, rloo, reinforce_baseline) has no critic, and a reward made
of programs alone (`ppo.reward_fn`, or `ppo.rewards` without a reward_model source) no reward model:
neither is counted anywhere then.
With `ppo.reuse_rollout_forward` the first micro-batch's actor and critic forwards keep their graphs
from the experience forwards to the update: both graphs are added to the experience phase, and the
update holds them together (the critic's graph waits through the actor's backward). With
`ppo.generation: static | graph` the static decoder allocates its KV cache once and keeps it for the run,
so the experience and update phases hold it too (and with `graph`, the captured step's B*V output logits).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rlhf import engine
from rlhf.config import DeepSpeedCfg, LoraCfg, PipelineConfig, ZeroRoleCfg

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CONTEXT_RESERVE_GIB = 1.0  # CUDA context, NCCL, cuBLAS workspaces, fragmentation: outside the estimate
USABLE_FRACTION = 0.92

# Architectures for hub ids whose config.json is not on this machine (offline planning). Numbers from the
# models' published config.json files.
_LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
              "tie_word_embeddings": False}
_LLAMA3_70B = {**_LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64}
KNOWN_ARCHS: dict[str, dict] = {
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA3_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-70B-Instruct": _LLAMA3_70B,
    "meta-llama/Llama-3.1-70B-Instruct": _LLAMA3_70B,
}


@dataclass(frozen=True)
class LoraCounts:
    """One model as peft wraps it for LoRA training."""

    params: int
    """Every parameter it holds: the frozen base, the adapters and, for a classifier, the trained copy
    peft makes of its score head (`modules_to_save`; the original stays in the model)."""
    trained: int
    """Parameters with gradients and optimizer state: the adapters, plus that score head."""


@dataclass(frozen=True)
class Arch:
    """Sizes of one architecture, from its config.json."""

    source: str
    lm_params: int
    """Parameters of the causal LM (tied embeddings counted once)."""
    cls_params: int
    """Parameters of the 1-label sequence classifier (no LM head, a score head)."""
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_heads: int
    head_dim: int
    largest_layer: int
    """Parameters of the largest module ZeRO-3 gathers at once (a decoder layer or the embedding)."""
    lm_lora: LoraCounts | None = None
    """The causal LM with `model.lora`'s adapters (None: counted without LoRA)."""
    cls_lora: LoraCounts | None = None
    """The sequence classifier with `model.lora`'s adapters."""

    def counts(self, *, lm: bool, lora: bool) -> tuple[int, int]:
        """(parameters held, parameters trained) of this architecture as a trained model."""
        if not lora:
            params = self.lm_params if lm else self.cls_params
            return params, params
        adapted = self.lm_lora if lm else self.cls_lora
        if adapted is None:
            raise ValueError(f"{self.source}: counted without LoRA; use architecture(name, lora=cfg.model.lora)")
        return adapted.params, adapted.trained


def _config_dict(name: str) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) without loading weights or touching the network."""
    from rlhf import models

    local = models.resolve_model(name)
    path = Path(local) / "config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text(encoding="utf-8")), cached
    except ImportError:
        pass
    if name in KNOWN_ARCHS:
        return dict(KNOWN_ARCHS[name]), f"rlhf.plan.KNOWN_ARCHS[{name!r}]"
    from rlhf.errors import ModelError

    raise ModelError(f"{name}: no config.json here or in the Hugging Face cache, and not in rlhf.plan.KNOWN_ARCHS; "
                     "point model.name_or_path at a local model dir to plan for it")


def _lora_counts(model, lora: LoraCfg, task_type: str) -> LoraCounts:
    """`model` (on the meta device) wrapped by peft with the config the stages use (`models.lora_config`)."""
    from peft import get_peft_model

    from rlhf import models
    from rlhf.errors import ModelError

    try:
        wrapped = get_peft_model(model, models.lora_config(replace(lora, enabled=True), task_type=task_type))
    except ValueError as err:
        raise ModelError(f"model.lora.target_modules: {str(err).splitlines()[0][:200]}") from None
    params = list(wrapped.parameters())
    return LoraCounts(params=sum(p.numel() for p in params), trained=sum(p.numel() for p in params if p.requires_grad))


def architecture(name: str, lora: LoraCfg | None = None) -> Arch:
    """Parameter counts and shapes of `name` (alias, local dir, cached or known hub id), on the meta device;
    with `lora` (its `enabled` aside) also both models' counts with those adapters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    raw, source = _config_dict(name)
    model_type = raw.pop("model_type")
    raw.pop("quantization_config", None)
    conf = AutoConfig.for_model(model_type, **raw)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(conf)
        conf.num_labels = 1
        cls = AutoModelForSequenceClassification.from_config(conf)
    layer_mods = [m for m in lm.modules() if isinstance(m, torch.nn.ModuleList)]
    layer = max((sum(p.numel() for p in blk.parameters()) for mod in layer_mods for blk in mod), default=0)
    embed = lm.get_input_embeddings().weight.numel()
    heads = conf.num_attention_heads
    arch = Arch(source=source, lm_params=sum(p.numel() for p in lm.parameters()),
                cls_params=sum(p.numel() for p in cls.parameters()), layers=conf.num_hidden_layers,
                hidden=conf.hidden_size, intermediate=getattr(conf, "intermediate_size", 4 * conf.hidden_size),
                vocab=conf.vocab_size, kv_heads=getattr(conf, "num_key_value_heads", None) or heads,
                head_dim=getattr(conf, "head_dim", None) or conf.hidden_size // heads, largest_layer=max(layer, embed))
    if lora is None:
        return arch
    with torch.device("meta"):  # the adapters peft adds are shapes only too
        return replace(arch, lm_lora=_lora_counts(lm, lora, "CAUSAL_LM"), cls_lora=_lora_counts(cls, lora, "SEQ_CLS"))


def reward_source(cfg: PipelineConfig) -> str | None:
    """Where the reward model's architecture comes from: the reward stage's output, else `reward.base_model`;
    None when it is the policy's (the reward stage then starts from the SFT output or `model.name_or_path`)."""
    final = cfg.stage_dir("reward") / "final"
    return str(final) if (final / "config.json").is_file() else cfg.reward.base_model


def _lora_roles(cfg: PipelineConfig, stage: str) -> tuple[bool, bool]:
    """(the stage's trained model trains LoRA adapters (policy, actor or reward model), the PPO critic does)."""
    critic = cfg.model.lora.enabled if cfg.ppo.critic_lora is None else cfg.ppo.critic_lora
    return cfg.model.lora.enabled, stage == "ppo" and cfg.ppo.uses_critic and critic


def architectures(cfg: PipelineConfig, stage: str | None = None) -> tuple[Arch, Arch]:
    """(the policy's architecture, the reward model's) for `stage`, with LoRA counts where a role uses them."""
    stage = stage or cfg.stages[-1]
    lora = cfg.model.lora if any(_lora_roles(cfg, stage)) else None
    policy = architecture(cfg.model.name_or_path, lora)
    reads_reward = stage == "reward" or (stage == "ppo" and cfg.ppo.needs_reward_stage)
    source = reward_source(cfg) if reads_reward else None
    return policy, (policy if source is None else architecture(source, lora))


# --------------------------------------------------------------------------- the memory model


@dataclass
class ModelMem:
    """One model's memory on one GPU (bytes) and in CPU memory per rank (offloaded state)."""

    role: str
    params: int
    trained: bool
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    trained_params: int = 0
    """Parameters with gradients and optimizer state (all of `params`, or the LoRA adapters (+ head))."""
    arch_source: str = ""
    """Where its architecture came from."""
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    working: float = 0.0
    """ZeRO-3 gathered layers (prefetch)."""
    buckets: float = 0.0
    """DeepSpeed's fixed buffers: the gradient reduce bucket (trained, ZeRO >= 1) and the ZeRO-3 prefetch."""
    cpu: float = 0.0
    local_param_numel: float = 0.0
    """Parameter elements this rank holds (its ZeRO-3 shard, else all), as in <run>/ppo/memory.json."""
    local_optim_numel: float = 0.0
    """Adam m and v elements this rank holds, as in <run>/ppo/memory.json."""

    @property
    def state(self) -> float:
        return self.weights + self.grads + self.optimizer + self.working + self.buckets


def model_memory(role: str, params: int, arch: Arch, zero: ZeroRoleCfg, *, trained: bool, world: int,
                 dtype_bytes: int, trained_params: int | None = None) -> ModelMem:
    """Model state of one model under its ZeRO settings (see the module docstring). A trained model trains
    `trained_params` of its `params` (default: all; LoRA: the adapters, plus a classifier's score head)."""
    z = zero.zero_stage if trained else (3 if zero.zero_stage == 3 else 0)
    off_param = bool(zero.offload_param) and z == 3
    off_opt = bool(zero.offload_optimizer) and trained and z > 0
    trainable = (params if trained_params is None else trained_params) if trained else 0
    m = ModelMem(role, params, trained, z, off_opt, off_param, trainable, arch.source)
    shard = params / world if z == 3 else params
    m.local_param_numel = shard
    m.weights = 0.0 if off_param else shard * dtype_bytes
    m.cpu += shard * dtype_bytes if off_param else 0.0
    if z == 3:
        m.working = 2 * arch.largest_layer * dtype_bytes
    m.buckets = bucket_bytes(arch.hidden, z, trained=trained, dtype_bytes=dtype_bytes)
    if trained:
        opt_shard = trainable / world if z >= 1 else trainable
        m.local_optim_numel = 2 * opt_shard
        grads = (trainable / world if z >= 2 else trainable) * dtype_bytes
        master = 4 * opt_shard if (z >= 1 or dtype_bytes != 4) else 0.0
        optim = master + 8 * opt_shard
        if off_opt:
            m.cpu += optim + (grads if z >= 2 else 0.0)
            grads = grads if z < 2 else 0.0
            optim = 0.0
        m.grads, m.optimizer = grads, optim
    return m


def bucket_bytes(hidden: int, zero_stage: int, *, trained: bool, dtype_bytes: int) -> float:
    """DeepSpeed's buffers for one model at the bucket sizes `engine.ds_config` sets from `hidden`: the
    reduce bucket of a trained model at ZeRO >= 1 (one buffer: overlap_comm, which doubles it, is off at
    ZeRO-1/2 there) and ZeRO-3's prefetched parameters; ZeRO-1/2's all-gather bucket allocates nothing."""
    sizes = engine.bucket_sizes(hidden, zero_stage)
    elements = (sizes["reduce_bucket_size"] if trained and zero_stage >= 1 else 0)
    elements += sizes.get("stage3_prefetch_bucket_size", 0)
    return float(elements * dtype_bytes)


def train_activations(arch: Arch, micro_batch: int, seq: int, dtype_bytes: int, *, lm: bool,
                      checkpointing: bool = False) -> float:
    """Activation bytes of one training forward+backward (see the module docstring)."""
    per_layer = micro_batch * seq * arch.hidden * 34 * dtype_bytes / 2
    if checkpointing:
        acts = arch.layers * micro_batch * seq * arch.hidden * dtype_bytes + per_layer
    else:
        acts = arch.layers * per_layer
    return acts + (micro_batch * seq * arch.vocab * 4 * 2 if lm else 0.0)


def infer_activations(arch: Arch, batch: int, seq: int, dtype_bytes: int, *, lm: bool) -> float:
    """One inference forward: one layer's working set, plus fp32 logits for a causal LM."""
    layer = batch * seq * (4 * arch.hidden + 2 * arch.intermediate) * dtype_bytes
    return layer + (batch * seq * arch.vocab * 4 if lm else 0.0)


@dataclass
class Plan:
    stage: str
    world: int
    gpus: int
    nodes: int
    dtype: str
    models: list[ModelMem]
    phases: dict[str, float] = field(default_factory=dict)
    """Activation-like memory per phase (bytes), on top of every model's state."""

    @property
    def state(self) -> float:
        return sum(m.state for m in self.models)

    @property
    def arch_source(self) -> str:
        """The first model's architecture source, then each other source with the first role using it."""
        first = self.models[0].arch_source if self.models else ""
        others: dict[str, str] = {}
        for m in self.models:
            if m.arch_source != first:
                others.setdefault(m.arch_source, m.role)
        return "; ".join([first] + [f"{role} from {source}" for source, role in others.items()])

    @property
    def peak(self) -> float:
        return self.state + max(self.phases.values(), default=0.0)

    @property
    def cpu_per_node(self) -> float:
        return sum(m.cpu for m in self.models) * self.gpus

    def fits(self, gpu_mem_gib: float) -> bool:
        return self.peak <= usable_bytes(gpu_mem_gib)

    def to_json(self) -> dict:
        return {"stage": self.stage, "world": self.world, "gpus": self.gpus, "nodes": self.nodes,
                "dtype": self.dtype, "arch_source": self.arch_source, "peak_bytes": self.peak,
                "state_bytes": self.state, "bucket_bytes": sum(m.buckets for m in self.models),
                "cpu_per_node_bytes": self.cpu_per_node, "phases": self.phases,
                "models": [{**asdict(m), "state": m.state} for m in self.models]}


def usable_bytes(gpu_mem_gib: float) -> float:
    return (USABLE_FRACTION * gpu_mem_gib - CONTEXT_RESERVE_GIB) * GIB


def _zero_for(ds: DeepSpeedCfg, role: str | None) -> ZeroRoleCfg:
    if role is None:  # Trainer-based stages use the top-level settings
        return ZeroRoleCfg(ds.zero_stage, ds.offload_param, ds.offload_optimizer)
    return ds.role(role)


def estimate(cfg: PipelineConfig, *, gpus: int = 1, nodes: int = 1, arch: Arch | None = None,
             ds: DeepSpeedCfg | None = None, stage: str | None = None, reward_arch: Arch | None = None) -> Plan:
    """Per-GPU memory of the models of `stage` (default: the config's last stage). `arch` is the policy's
    architecture and `reward_arch` the reward model's (default: `architectures(cfg, stage)`, or `arch`
    when only `arch` is given)."""
    stage = stage or cfg.stages[-1]
    if arch is None:
        arch, reward_arch = architectures(cfg, stage)
    reward_arch = reward_arch or arch
    ds = ds or cfg.deepspeed
    dtype = "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype  # a plan is for GPUs
    world, b = gpus * nodes, DTYPE_BYTES[dtype]
    policy_lora, critic_lora = _lora_roles(cfg, stage)
    plan = Plan(stage, world, gpus, nodes, dtype, [])

    def add(role: str, arch_: Arch, lm: bool, trained: bool, lora: bool, ds_role: str | None) -> None:
        params, trainable = arch_.counts(lm=lm, lora=lora and trained)
        plan.models.append(model_memory(role, params, arch_, _zero_for(ds, ds_role), trained=trained,
                                        world=world, dtype_bytes=b, trained_params=trainable))

    if stage == "ppo":
        _ppo(cfg, plan, (arch, reward_arch), b, add, (policy_lora, critic_lora))
        return plan
    train = getattr(cfg, stage)
    rows = train.batch_size * (1 if stage == "sft" else 2)  # preference stages forward chosen and rejected
    seq = cfg.data.max_length
    if stage == "reward":
        add("reward", reward_arch, False, True, policy_lora, None)
    else:
        add("policy", arch, True, True, policy_lora, None)
    if stage == "dpo" and not cfg.dpo.precompute_ref_log_probs and not policy_lora:  # LoRA: adapters off
        add("ref", arch, True, False, False, None)
    plan.phases["train"] = train_activations(reward_arch if stage == "reward" else arch, rows, seq, b,
                                             lm=stage != "reward", checkpointing=train.gradient_checkpointing)
    return plan


def _ppo(cfg: PipelineConfig, plan: Plan, archs: tuple[Arch, Arch], b: int, add, lora: tuple[bool, bool]) -> None:
    """Actor, critic (none for a critic-free `ppo.advantage`), reference and reward model (none when programs
    alone score), and the phases, each model on its own architecture. The rollout holds `ppo.rollout_rows`
    rows per rank; the forwards and the update go by micro-batch."""
    ppo = cfg.ppo
    arch, reward_arch = archs
    critic_arch = reward_arch if ppo.critic_init == "reward" else arch
    add("actor", arch, True, True, lora[0], "actor")
    if ppo.uses_critic:
        add("critic", critic_arch, False, True, lora[1], "critic")
    if not lora[0]:  # a LoRA actor is its own reference (adapters disabled)
        add("ref", arch, True, False, False, "ref")
    if ppo.needs_reward_model:
        add("reward", reward_arch, False, False, False, "reward")
    prompt, seq, mb = cfg.data.max_prompt_length, cfg.data.max_prompt_length + ppo.max_new_tokens, ppo.micro_batch_size
    rows = ppo.rollout_rows
    kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * rows * seq * b
    actor = plan.models[0]
    gathered = actor.params * b - actor.weights if actor.zero_stage == 3 else 0.0
    prefill = infer_activations(arch, rows, prompt, b, lm=False)
    plan.phases["rollout"] = gathered + kv + prefill + rows * arch.vocab * 4
    scalar_archs = [critic_arch] if ppo.uses_critic else []
    scalar_archs += [reward_arch] if ppo.needs_reward_model else []
    plan.phases["experience"] = max([infer_activations(arch, mb, seq, b, lm=True)]
                                    + [infer_activations(a, mb, seq, b, lm=False) for a in scalar_archs])
    actor_graph = train_activations(arch, mb, seq, b, lm=True)
    critic_graph = train_activations(critic_arch, mb, seq, b, lm=False) if ppo.uses_critic else 0.0
    if ppo.reuse_rollout_forward:  # the first micro-batch's graphs, kept from the experience forwards
        plan.phases["experience"] += actor_graph + critic_graph
        plan.phases["update"] = actor_graph + critic_graph
    else:
        plan.phases["update"] = max(actor_graph, critic_graph)
    # `ppo.generation: auto` samples with HF generate for now (stages/ppo/experience.make_decoder)
    # The static decoder keeps its cache between rollouts, except under ZeRO-3, where the actor's gathered
    # weights move every rollout (the graph is captured anew anyway) and the loop releases it after each.
    if ppo.generation in ("static", "graph") and actor.zero_stage != 3:
        kept = kv + (rows * arch.vocab * b if ppo.generation == "graph" else 0.0)
        plan.phases["experience"] += kept
        plan.phases["update"] += kept


# --------------------------------------------------------------------------- suggestions

# Cheapest first: less sharding means less communication; offload is slowest (PCIe traffic every step).
CANDIDATES: list[tuple[int, bool, bool]] = [
    (0, False, False), (1, False, False), (2, False, False), (3, False, False),
    (2, True, False), (3, True, False), (3, True, True),
]


def uniform_ds(base: DeepSpeedCfg, zero: int, off_opt: bool, off_param: bool) -> DeepSpeedCfg:
    """`base` with one ZeRO setting for every model (per-role overrides cleared)."""
    return DeepSpeedCfg(enabled=base.enabled, zero_stage=zero, offload_optimizer=off_opt, offload_param=off_param,
                        torch_adam=base.torch_adam, config_file=base.config_file)


def suggest(cfg: PipelineConfig, *, gpus: int, nodes: int, gpu_mem_gib: float, arch: Arch,
            stage: str | None = None, reward_arch: Arch | None = None) -> tuple[str, Plan] | None:
    """The cheapest uniform setting whose peak fits, as `--set` overrides, with its plan; None if none fits."""
    for zero, off_opt, off_param in CANDIDATES:
        ds = uniform_ds(cfg.deepspeed, zero, off_opt, off_param)
        plan = estimate(cfg, gpus=gpus, nodes=nodes, arch=arch, ds=ds, stage=stage, reward_arch=reward_arch)
        if plan.fits(gpu_mem_gib):
            sets = [f"deepspeed.zero_stage={zero}", f"deepspeed.offload_optimizer={str(off_opt).lower()}",
                    f"deepspeed.offload_param={str(off_param).lower()}"]
            return " ".join(f"--set {s}" for s in sets), plan
    return None


def min_nodes(cfg: PipelineConfig, *, gpu_mem_gib: float, arch: Arch, gpus_per_node: int,
              stage: str | None = None, reward_arch: Arch | None = None) -> int | None:
    """Fewest nodes (of `gpus_per_node`) on which full ZeRO-3 with offload fits; None beyond 64 nodes."""
    ds = uniform_ds(cfg.deepspeed, 3, True, True)
    for nodes in range(1, 65):
        plan = estimate(cfg, gpus=gpus_per_node, nodes=nodes, arch=arch, ds=ds, stage=stage, reward_arch=reward_arch)
        if plan.fits(gpu_mem_gib):
            return nodes
    return None


# --------------------------------------------------------------------------- output


def _units(peak: float) -> tuple[float, str]:
    return (GIB, "GiB") if peak >= GIB else (1024**2, "MiB")


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_table(plan: Plan) -> str:
    unit, name = _units(plan.peak)

    def num(x: float, width: int = 8) -> str:
        return f"{x / unit:{width}.2f}"

    lines = [f"{plan.stage}: {plan.world} rank(s) = {plan.gpus} GPU(s) x {plan.nodes} node(s), {plan.dtype} weights; "
             f"architecture from {plan.arch_source}",
             f"{'model':<8} {'params':>8} {'trained':>8} {'zero':>4} {'offload':>9} {'weights':>8} {'grads':>8} "
             f"{'optim':>8} {'zero3buf':>8} {'buckets':>8} {'state':>8}   ({name} per GPU)"]
    for m in plan.models:
        off = "+".join(x for x, on in (("opt", m.offload_optimizer), ("param", m.offload_param)) if on) or "-"
        trained = _count(m.trained_params) if m.trained else "-"
        lines.append(f"{m.role:<8} {_count(m.params):>8} {trained:>8} {m.zero_stage:>4} {off:>9} {num(m.weights)} "
                     f"{num(m.grads)} {num(m.optimizer)} {num(m.working)} {num(m.buckets)} {num(m.state)}")
    lines.append(f"{'states':<8} {'':>8} {'':>8} {'':>4} {'':>9} {'':>8} {'':>8} {'':>8} {'':>8} {'':>8} "
                 f"{num(plan.state)}")
    what = {"rollout": "gathered actor + KV cache + prefill", "experience": "inference forwards (+ kept graphs)",
            "update": "training activations (+ kept graphs)", "train": "training activations"}
    for phase, extra in plan.phases.items():
        lines.append(f"  + {phase:<10} {num(extra)} {name}  ({what[phase]})")
    elems = sum(m.local_param_numel + m.local_optim_numel for m in plan.models)
    lines.append(f"peak per GPU {num(plan.peak, 0)} {name}; offloaded to CPU {plan.cpu_per_node / GIB:.2f} GiB per node; "
                 f"model-state elements per rank (params + Adam m,v) {_count(elems)}")
    return "\n".join(lines)


def report(cfg: PipelineConfig, *, gpus: int, nodes: int, gpu_mem_gib: float | None,
           stage: str | None = None) -> tuple[str, bool]:
    """The table, the verdict and a suggestion; returns (text, configured settings fit or unknown)."""
    arch, reward_arch = architectures(cfg, stage)
    plan = estimate(cfg, gpus=gpus, nodes=nodes, arch=arch, stage=stage, reward_arch=reward_arch)
    out = [format_table(plan)]
    servers = [r.url for r in cfg.ppo.reward_sources if r.url is not None] if plan.stage == "ppo" else []
    if servers:  # their models live elsewhere: not in the table
        here = "" if cfg.ppo.needs_reward_model else "; no reward model is loaded here"
        out.append(f"reward scored over HTTP by {', '.join(servers)}{here}")
    if gpu_mem_gib is None:
        out.append("no GPU memory given (--gpu-mem or RLHF_GPU_MEM_GIB): no fit check")
        return "\n".join(out), True
    ok = plan.fits(gpu_mem_gib)
    out.append(f"configured settings {'fit' if ok else 'do NOT fit'} in {gpu_mem_gib:g} GiB "
               f"(usable {usable_bytes(gpu_mem_gib) / GIB:.1f} GiB)")
    best = suggest(cfg, gpus=gpus, nodes=nodes, gpu_mem_gib=gpu_mem_gib, arch=arch, stage=stage,
                   reward_arch=reward_arch)
    if best is not None:
        out.append(f"cheapest setting that fits (peak {best[1].peak / GIB:.2f} GiB): {best[0]}")
    else:
        need = min_nodes(cfg, gpu_mem_gib=gpu_mem_gib, arch=arch, gpus_per_node=gpus, stage=stage,
                         reward_arch=reward_arch)
        more = f"; ZeRO-3 with full offload fits on {need} node(s) of {gpus} GPU(s)" if need else ""
        out.append(f"nothing fits on {gpus * nodes} GPU(s) of {gpu_mem_gib:g} GiB{more} "
                   "(or shorten data.max_length / ppo.max_new_tokens, lower batch sizes, enable LoRA)")
    return "\n".join(out), ok


def fit_problem(cfg: PipelineConfig, *, gpus: int, nodes: int, gpu_mem_gib: float) -> str | None:
    """One line when the configured settings cannot fit (for preflight), else None."""
    arch, reward_arch = architectures(cfg)
    plan = estimate(cfg, gpus=gpus, nodes=nodes, arch=arch, reward_arch=reward_arch)
    if plan.fits(gpu_mem_gib):
        return None
    best = suggest(cfg, gpus=gpus, nodes=nodes, gpu_mem_gib=gpu_mem_gib, arch=arch, reward_arch=reward_arch)
    fix = f"try {best[0]}" if best else "no ZeRO/offload setting fits; add GPUs or shrink batch/lengths"
    return (f"{cfg.source}: {plan.stage} needs about {plan.peak / GIB:.1f} GiB per GPU on {plan.world} rank(s), "
            f"more than {gpu_mem_gib:g} GiB allows (`rlhf plan --config {cfg.source}` for the table); {fix}")

