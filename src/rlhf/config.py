"""One typed schema for a pipeline file.

A pipeline file is YAML with the sections `run`, `model`, `data`, `sft`, `reward`, `final_stage`,
`ppo`, `dpo`, `orpo`, `deepspeed` and `logging`. Every section is a dataclass below, with its defaults and
its range rules (`__post_init__`); `rlhf.coerce` fills them from the YAML, checking types and rejecting
unknown keys with the closest valid key. `--set a.b=value` overrides are merged before validation, so they
get the same checks (their errors name `--set`, not the file). `stage_settings`, `RUN_ONLY_KEYS` and
`changed_settings` say which keys a stage's weights depend on.

Importing this module loads the standard library, PyYAML, `rlhf.errors` and `rlhf.coerce`. The checks of
key mappings and `stage_settings` import `rlhf.data` (its formats and its stage sources) when they run;
that package imports neither torch, transformers nor datasets.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf import coerce
from rlhf.coerce import require

STAGE_ORDER = ("sft", "reward", "ppo", "dpo", "orpo")
FINAL_STAGES = ("ppo", "dpo", "orpo")


# --------------------------------------------------------------------------- sections


@dataclass
class RunCfg:
    name: str = "default"
    """Run name: outputs go to `<output_dir>/<name>/<stage>/`."""
    output_dir: str = "runs"
    """Parent directory of all runs (relative paths are relative to the working directory)."""
    seed: int = 42
    """Seed for data shuffling, splits, initialisation and sampling."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when available, else CPU (fp32 only on CPU)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss, gradient, reward or KL: `stop` the run (the last good checkpoint is kept), or `skip`
    that optimizer step (PPO: that rollout) with a warning and go on."""
    max_consecutive_skips: int = 5
    """With `on_nonfinite: skip`, stop after this many skipped steps in a row (the fault is persistent)."""
    claim_timeout_s: float = 300.0
    """A run claims its stage dir (`claim.json`) and refreshes the claim every tenth of this. A start finding
    a claim made on another machine takes it over only when the claim went this long without a refresh (on
    the same machine: as soon as its process is gone); until then it refuses to start (exit 2)."""
    collective_timeout_s: float = 1800.0
    """Under a launcher: how long a rank waits in one collective or barrier (gloo and NCCL alike), and for
    the other ranks to join at the start, before its run fails. Healthy waits must fit in it: the other
    ranks wait at a barrier while rank 0 saves `final/` (minutes for a large model) and while nodes with
    their own disks receive copies of each checkpoint over the network; raise it for those. A rank that
    dies without a word (SIGKILL) stops an NCCL run only after this long."""

    @property
    def dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def __post_init__(self) -> None:
        require(bool(self.name.strip()) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        require(self.max_consecutive_skips > 0, "max_consecutive_skips", "must be > 0")
        require(self.claim_timeout_s > 0, "claim_timeout_s", "must be > 0")
        require(self.collective_timeout_s > 0, "collective_timeout_s", "must be > 0")


@dataclass
class LoraCfg:
    enabled: bool = False
    """Train LoRA adapters instead of all weights (the saved model is merged)."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input. Kept at 0 for PPO so the first ratio is exactly 1."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or `all-linear`."""

    def __post_init__(self) -> None:
        require(self.r > 0, "r", "must be > 0")
        require(self.alpha > 0, "alpha", "must be > 0")
        require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")


@dataclass
class ModelCfg:
    name_or_path: str = "smollm2-135m-instruct"
    """Base model: an alias (`smollm2-135m-instruct`, `tiny-random`), a local HF dir, or a hub id."""
    tokenizer: str | None = None
    """Tokenizer dir or id; defaults to the model's own."""
    chat_template: str | None = None
    """None keeps the tokenizer's template (ChatML if it has none); `chatml`; or a path to a .jinja file."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Weight dtype. `auto`: bfloat16 when the run is on a GPU that has it, else float32 (on CPU only float32
    is sensible: bf16 matmul is hundreds of times slower there). `rlhf plan` counts `auto` as bfloat16."""
    trust_remote_code: bool = False
    """Allow model repos to run their own Python code. Off unless you trust the source."""
    allow_pickle: bool = False
    """Allow pickle-based weight files (.bin/.pt). Off: pickle can execute arbitrary code."""
    lora: LoraCfg = field(default_factory=LoraCfg)
    """LoRA settings, shared by every trainable stage."""


def _check_columns(columns: dict[str, str], key: str) -> None:
    """A key mapping may only name keys the data formats read (`rlhf.data.formats.ROW_KEYS`)."""
    from rlhf.data.formats import ROW_KEYS  # imported here: rlhf.data is light, but loads after this module

    unknown = sorted(set(columns) - set(ROW_KEYS))
    require(not unknown, key, f"maps {', '.join(map(repr, unknown))}, which no format reads; map onto one of "
             f"{', '.join(ROW_KEYS)} (as `schema key: your key`)")


@dataclass
class SourceCfg:
    """One source of a split: a file with its own key names, or one of several mixed by weight."""

    path: str = ""
    """Data file, `save_to_disk` dir or hub dataset name."""
    weight: float = 1.0
    """How much of this source goes into the mix: 1 takes every row once, 0.5 a seeded half, 2 every row twice."""
    columns: dict[str, str] = field(default_factory=dict)
    """This source's own key names: `schema key: its key`, e.g. `{prompt: question, chosen: good}`; merged
    over `data.columns`."""

    def __post_init__(self) -> None:
        require(bool(self.path.strip()), "path", "is required: a data file, save_to_disk dir or hub dataset name")
        require(self.weight > 0, "weight", "must be > 0")
        _check_columns(self.columns, "columns")


DataSource = str | SourceCfg | list[str | SourceCfg] | None
SOURCE_KEYS = ("sft", "preference", "prompts", "sft_eval", "preference_eval", "prompts_eval")


@dataclass
class DataCfg:
    sft: DataSource = None
    """SFT data: prompt/completion, chat `messages`, ShareGPT `conversations`, Alpaca, or a preference set (its
    chosen side is used). Each data key takes a path, a `{path, weight, columns}` mapping, or a list of them."""
    preference: DataSource = None
    """Preference pairs (prompt, chosen, rejected; plain, chat, UltraFeedback-style, implicit-prompt or HH-RLHF)
    for reward/DPO/ORPO."""
    prompts: DataSource = None
    """Prompts for PPO rollouts; defaults to the prompts of `preference`."""
    sft_eval: DataSource = None
    """Held-out SFT data; when unset, `eval_fraction` of `sft` is held out."""
    preference_eval: DataSource = None
    """Held-out preference pairs; when unset, `eval_fraction` of `preference` is held out."""
    prompts_eval: DataSource = None
    """Held-out prompts for evaluation; when unset, `eval_fraction` of the prompts is held out."""
    columns: dict[str, str] = field(default_factory=dict)
    """Key mapping for every source: `schema key: your key`, e.g. `{prompt: question, chosen: response_j}`
    (OpenRLHF's input_key/chosen_key). A source's own `columns` win over these."""
    split: str = "train"
    """Split to read from save_to_disk dirs and hub datasets."""
    eval_fraction: float = 0.1
    """Share of rows held out for evaluation when no eval file is given (0 disables)."""
    eval_max_rows: int | None = 2000
    """Held-out rows the SFT, reward, DPO and ORPO stages evaluate at most (their Trainer's eval set and their
    checks after training): a sample seeded by `run.seed` of the held-out rows within `max_length`; null takes
    them all."""
    bad_rows: Literal["error", "skip"] = "error"
    """What to do with an invalid row: stop with `file:line: reason`, or skip it and report the count."""
    verbosity: Literal["warn", "block", "off"] = "warn"
    """Length bias of the preference pairs the reward, DPO and ORPO stages read (chosen longer, or shorter,
    in >= 75% of pairs, or a margin that tracks the length difference; `rlhf.verbosity`): preflight logs a
    `warn`ing, makes it a blocker (`block`), or does not check (`off`)."""
    max_length: int = 512
    """Maximum tokens of prompt + response."""
    max_prompt_length: int | None = None
    """Maximum prompt tokens (PPO rollouts); longer prompts keep their end. Default: half of max_length."""

    def __post_init__(self) -> None:
        require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        require(self.eval_max_rows is None or self.eval_max_rows > 0, "eval_max_rows", "must be > 0 or null")
        require(self.max_length > 0, "max_length", "must be > 0")
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2
        require(0 < self.max_prompt_length < self.max_length, "max_prompt_length", "must be in (0, max_length)")
        _check_columns(self.columns, "columns")
        if self.columns:  # carried by each source, so whoever reads a source reads it mapped
            for key in SOURCE_KEYS:
                setattr(self, key, _with_columns(getattr(self, key), self.columns))


def _with_columns(source: DataSource, columns: dict[str, str]) -> DataSource:
    """`source` with `columns` under each of its own mappings."""
    if source is None:
        return None
    if isinstance(source, list):
        return [_with_columns(item, columns) for item in source]
    if isinstance(source, str):
        return SourceCfg(path=source, columns=dict(columns))
    return dataclasses.replace(source, columns={**columns, **source.columns})


@dataclass
class TrainCfg:
    """Optimisation settings shared by the Trainer-based stages (SFT, reward, DPO, ORPO)."""

    learning_rate: float = 1e-5
    """Peak learning rate."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 uses `epochs`."""
    batch_size: int = 8
    """Micro-batch per device."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    eval_batch_size: int = 8
    """Batch per device for evaluation."""
    warmup_ratio: float = 0.0
    """Share of steps with linear warm-up."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    """Learning-rate schedule after warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    logging_steps: int = 1
    """Log metrics every N optimizer steps."""
    save_steps: int = 50
    """Checkpoint every N optimizer steps (the run resumes from the latest)."""
    save_total_limit: int = 2
    """Checkpoints kept on disk."""
    eval_steps: int = 0
    """Evaluate every N steps; 0 evaluates once at the end."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""

    def __post_init__(self) -> None:
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(self.epochs > 0, "epochs", "must be > 0")
        require(self.max_steps == -1 or self.max_steps > 0, "max_steps", "must be > 0, or -1 to use epochs")
        for key in ("batch_size", "grad_accum", "eval_batch_size", "logging_steps", "save_steps"):
            require(getattr(self, key) > 0, key, "must be > 0")
        require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        require(self.save_total_limit > 0, "save_total_limit", "must be > 0")
        require(self.eval_steps >= 0, "eval_steps", "must be >= 0")


@dataclass
class SFTCfg(TrainCfg):
    learning_rate: float = 2e-5
    """Peak learning rate."""
    packing: bool = False
    """Pack several examples into each sequence (faster on short data; loss stays on completions)."""
    completion_only_loss: bool = True
    """Loss on the assistant turns only (every one of a multi-turn conversation); False trains on the prompt too."""


@dataclass
class RewardCfg(TrainCfg):
    learning_rate: float = 1e-5
    """Peak learning rate."""
    base_model: str | None = None
    """Model to put the score head on. Default: the SFT output when the file has an `sft` section, else `model.name_or_path`."""
    margin: bool = False
    """Use a per-pair `margin` column in the Bradley-Terry loss (rows without it use 0)."""
    center_rewards_coefficient: float = 0.0
    """Penalty on the mean reward, keeping scores centred near 0 (0 disables)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", "must be >= 0")


@dataclass
class ZeroRoleCfg:
    """DeepSpeed settings for one PPO model; unset fields inherit from the `deepspeed` section."""

    zero_stage: int | None = None
    """ZeRO stage 0-3."""
    offload_param: bool | None = None
    """Keep parameters in CPU memory (ZeRO-3 only)."""
    offload_optimizer: bool | None = None
    """Keep optimizer state in CPU memory (ZeRO-1/2/3; trained models only)."""

    def __post_init__(self) -> None:
        require(self.zero_stage is None or self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")


REWARD_MODEL = "reward_model"


@dataclass
class RewardSourceCfg:
    """One source of the final stage's reward; a response's reward is the weighted sum of its sources."""

    source: str | None = None
    """`reward_model` (the reward stage's output, its scores normalised by `ppo.normalize_reward`) or
    `module:function`, a program: called with the prompts (message lists) and the responses (texts), and
    with each field of the prompt rows that it names as a parameter (all of them with `**kwargs`) as a list;
    returns one float per response. Unset: `reward_model`, or the server at `url` when that is set."""
    weight: float = 1.0
    """This source's factor in the sum."""
    url: str | None = None
    """A reward server, `http://host:port` (`rlhf serve`, or OpenRLHF's serve_rm with `protocol: openrlhf`),
    instead of `source`: each rank posts its own responses; `ppo.normalize_reward` standardises the scores by
    the reward stats the server reports (`/health`), as a local reward model's; no reward model is loaded here."""
    token_env: str | None = None
    """With `url`: the environment variable holding the server's token, sent as `Authorization: Bearer`."""
    timeout_s: float = 60.0
    """With `url`: seconds to wait for one answer before retrying."""
    retries: int = 3
    """With `url`: tries after the first, with doubling waits from 0.5 s, before the run stops (its last
    checkpoint kept)."""
    protocol: Literal["rlhf", "openrlhf"] = "rlhf"
    """With `url`: `rlhf` posts prompts and responses to /score (the server renders them); `openrlhf` posts
    whole texts rendered with the policy's chat template to /get_reward, as OpenRLHF does."""

    def __post_init__(self) -> None:
        require(self.url is None or self.source is None, "url",
                f"and source ({self.source!r}) are two sources: give each its own entry in ppo.rewards")
        if self.url is None and self.source is None:
            self.source = REWARD_MODEL  # the default source; a url source keeps source unset
        require(self.source is None or self.source == REWARD_MODEL or ":" in self.source, "source",
                f"must be {REWARD_MODEL} or look like 'module:function', got {self.source!r}")
        if self.url is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(self.url)
            require(parts.scheme in ("http", "https") and bool(parts.hostname), "url",
                    "must look like http://host:port")
        require(self.token_env is None or self.url is not None, "token_env", "is read only with url")
        require(self.token_env is None or self.token_env.isidentifier(), "token_env",
                "must be an environment variable's name")
        require(self.timeout_s > 0, "timeout_s", "must be > 0")
        require(self.retries >= 0, "retries", "must be >= 0")

    @property
    def name(self) -> str:
        """How scores, stats and messages name this source: its url, else its `source`."""
        return self.url or self.source

    @property
    def is_program(self) -> bool:
        return self.url is None and self.source != REWARD_MODEL


@dataclass
class PPOCfg:
    steps: int = 100
    """PPO iterations; each samples `rollout_batch_size` prompts per rank, then updates."""
    rollout_batch_size: int = 16
    """Prompts per rollout per rank; each is answered `samples_per_prompt` times, so a rollout has
    rollout_batch_size x samples_per_prompt rows per rank."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (a group, kept on one rank); the critic-free estimators need >= 2."""
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_baseline"] = "gae"
    """How a response's advantage is estimated. `gae`: a critic's values and GAE (the classic four models).
    Critic-free, from the scores of each prompt's group of responses (no critic is built, trained or saved):
    `grpo` (score minus the group mean, over the group's std), `dr_grpo` (minus the group mean only),
    `rloo` (minus the mean of the group's other responses), `reinforce_baseline` (minus the group mean,
    then whitened over the global batch). `whiten_advantages` applies to `gae` only."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference goes: into the per-token rewards (`kl_estimator`; what the advantage
    estimator sees), or into the policy loss as kl_coef x the k3 estimate per token (as GRPO). The KL
    controller (`adaptive_kl`) sets the coefficient either way."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """How the policy loss averages over tokens: over every token of the minibatch (`token_mean`), per
    response then over responses (`seq_mean_token_mean`, GRPO), or per-response sums over max_new_tokens
    then over responses (`seq_mean_token_sum_norm`, Dr. GRPO)."""
    mini_batch_size: int = 4
    """Rows per optimizer step per rank (with grad_accum micro-batches of mini_batch_size / grad_accum)."""
    grad_accum: int = 1
    """Micro-batches per minibatch."""
    ppo_epochs: int = 1
    """Passes over each rollout."""
    learning_rate: float = 1e-6
    """Actor learning rate."""
    critic_learning_rate: float = 5e-6
    """Critic learning rate."""
    max_new_tokens: int = 64
    """Response length limit."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling (0 disables)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    clip_range_value: float = 0.2
    """Value clip range around the rollout values."""
    kl_coef: float = 0.05
    """KL penalty coefficient beta (initial value when adaptive)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator (http://joschu.net/blog/kl-approx.html)."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards `target_kl` (Ziegler et al. 2019)."""
    target_kl: float = 6.0
    """Target KL per response for the adaptive controller."""
    kl_horizon: int = 10000
    """Adaptive controller horizon."""
    kl_ceiling: float | None = None
    """Stop the run when mean KL per response exceeds this (None disables)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over the rollout (over all ranks' rows together)."""
    normalize_reward: bool = True
    """Standardise scores with the reward model's stored mean and std (a served one's as its server reports them)."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of responses that never emit EOS (None disables)."""
    overlong_penalty: float | None = None
    """Subtracted in full from the score of a response of max_new_tokens tokens, and linearly less from one
    within `overlong_buffer` tokens of it (DAPO's soft overlong punishment); None disables."""
    overlong_buffer: int | None = None
    """How many tokens before max_new_tokens the overlong penalty starts; None: a quarter of max_new_tokens."""
    policy_init: Literal["sft", "base"] = "sft"
    """Where the actor and its reference start: the SFT stage's output, or `base`: `model.name_or_path` itself,
    with no SFT stage (a program-reward task on an instruct model, say)."""
    critic_init: Literal["reward", "sft"] = "reward"
    """Initialise the critic from the reward model or from the policy's start (`sft`: the SFT output, or the
    base model under `policy_init: base`)."""
    critic_lora: bool | None = None
    """Train the critic as LoRA adapters plus its value head; None: as `model.lora.enabled` (a LoRA run
    then skips the full critic's weight gradients and optimizer state)."""
    reward_fn: str | None = None
    """`module:function(prompts, responses) -> scores` used instead of the reward model (shorthand for
    `rewards: [{source: module:function}]`)."""
    rewards: list[RewardSourceCfg] | None = None
    """The reward's sources, summed by weight: the reward model, programs and/or reward servers (`url`;
    `RewardSourceCfg`); null: the reward model alone (or `reward_fn`). Without a `reward_model` source no
    reward model is loaded."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm for actor and critic (0 disables)."""
    reuse_rollout_forward: bool = True
    """The update's first micro-batch backpropagates through the rollout's own actor and critic forwards
    of those rows instead of running them again (one actor and one critic forward fewer per step; both
    micro-batch graphs are held through the reference and reward forwards)."""
    save_steps: int = 20
    """Checkpoint every N PPO steps."""
    sample_every: int = 10
    """Log a few sample generations every N steps."""
    generation: Literal["auto", "hf", "static", "graph"] = "auto"
    """How rollouts are sampled: `hf` (transformers' generate), `static` (one static KV cache reused across
    rollouts, `rlhf.generation`), or `graph` (static, with the decode step replayed as a CUDA graph on
    GPUs; static elsewhere). `auto` is hf for now: on CPU both decode at the same speed (memory-bound,
    bench/README.md), and on GPUs graph becomes the default once it is measured faster there. Where the
    logits agree to the bit (tested on CPU in fp32, on the tiny model and SmolLM2-135M) all of them draw
    the same tokens for the same seed."""

    def __post_init__(self) -> None:
        for key in ("steps", "rollout_batch_size", "samples_per_prompt", "mini_batch_size", "grad_accum",
                    "ppo_epochs", "max_new_tokens", "save_steps", "sample_every"):
            require(getattr(self, key) > 0, key, "must be > 0")
        require(self.learning_rate > 0, "learning_rate", "must be > 0")
        require(self.critic_learning_rate > 0, "critic_learning_rate", "must be > 0")
        require(self.advantage == "gae" or self.samples_per_prompt >= 2, "samples_per_prompt",
                f"must be >= 2 for advantage: {self.advantage} (its baseline is the other responses to the same "
                "prompt); set it to 4 or more, or use advantage: gae")
        require(self.rollout_rows % self.mini_batch_size == 0, "mini_batch_size",
                 f"must divide the rollout's rows per rank ({self.rollout_rows}: rollout_batch_size "
                 f"{self.rollout_batch_size} x samples_per_prompt {self.samples_per_prompt})"
                 if self.samples_per_prompt > 1 else f"must divide rollout_batch_size ({self.rollout_batch_size})")
        require(self.mini_batch_size % self.grad_accum == 0, "grad_accum",
                 f"must divide mini_batch_size ({self.mini_batch_size})")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        require(self.top_k >= 0, "top_k", "must be >= 0")
        require(0.0 <= self.gamma <= 1.0, "gamma", "must be in [0, 1]")
        require(0.0 <= self.lam <= 1.0, "lam", "must be in [0, 1]")
        require(0.0 < self.clip_range < 1.0, "clip_range", "must be in (0, 1)")
        require(self.clip_range_value > 0, "clip_range_value", "must be > 0")
        require(self.kl_coef >= 0, "kl_coef", "must be >= 0")
        require(self.target_kl > 0, "target_kl", "must be > 0")
        require(self.kl_horizon > 0, "kl_horizon", "must be > 0")
        require(self.kl_ceiling is None or self.kl_ceiling > 0, "kl_ceiling", "must be > 0 or null")
        require(self.reward_fn is None or ":" in self.reward_fn, "reward_fn", "must look like 'module:function'")
        require(self.overlong_penalty is None or self.overlong_penalty >= 0, "overlong_penalty", "must be >= 0 or null")
        require(self.overlong_buffer is None or 0 < self.overlong_buffer <= self.max_new_tokens, "overlong_buffer",
                f"must be in [1, max_new_tokens ({self.max_new_tokens})] or null")
        require(self.rewards is None or self.reward_fn is None, "rewards",
                "and ppo.reward_fn are two ways to say the same: set one (reward_fn: F is rewards: [{source: F}])")
        require(self.rewards is None or len(self.rewards) > 0, "rewards", "is empty: list at least one source or "
                "set it to null (the reward model)")
        sources = [r.name for r in self.rewards or ()]
        require(len(set(sources)) == len(sources), "rewards", f"names a source twice ({sources})")

    @property
    def micro_batch_size(self) -> int:
        return self.mini_batch_size // self.grad_accum

    @property
    def rollout_rows(self) -> int:
        """Rows (responses) per rollout per rank: every prompt's group."""
        return self.rollout_batch_size * self.samples_per_prompt

    @property
    def reward_sources(self) -> list[RewardSourceCfg]:
        """What the reward is made of: `rewards`, else `reward_fn` alone, else the reward model alone."""
        if self.rewards is not None:
            return list(self.rewards)
        return [RewardSourceCfg(source=self.reward_fn or REWARD_MODEL)]

    @property
    def needs_reward_model(self) -> bool:
        """Whether a reward model scores (and is loaded): one of the reward's sources is the reward stage's."""
        return any(r.source == REWARD_MODEL for r in self.reward_sources)

    @property
    def needs_reward_stage(self) -> bool:
        """Whether the ppo stage reads the reward stage's output: for its reward model, or to initialise its
        critic (`critic_init: reward`; a critic-free `advantage` has none)."""
        return self.needs_reward_model or (self.uses_critic and self.critic_init == "reward")

    @property
    def uses_critic(self) -> bool:
        """Whether the run builds, trains and saves a critic (GAE needs its values; the others do not)."""
        return self.advantage == "gae"


@dataclass
class DPOCfg(TrainCfg):
    learning_rate: float = 5e-7
    """Peak learning rate (DPO wants small ones)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """DPO loss variant."""
    precompute_ref_log_probs: bool = False
    """Score the reference once before training instead of keeping it in memory."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, "beta", "must be > 0")


@dataclass
class ORPOCfg(TrainCfg):
    learning_rate: float = 8e-6
    """Peak learning rate."""
    beta: float = 0.1
    """Weight lambda of the odds-ratio term (Hong et al. 2024)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, "beta", "must be > 0")


@dataclass
class DeepSpeedCfg:
    enabled: bool | None = None
    """None: use DeepSpeed when started by a launcher (deepspeed, torchrun); True/False forces it."""
    zero_stage: int = 2
    """ZeRO stage 0-3 for every model unless a role below overrides it."""
    offload_optimizer: bool = False
    """Optimizer state in CPU memory."""
    offload_param: bool = False
    """Parameters in CPU memory (ZeRO-3 only)."""
    torch_adam: bool = True
    """torch's AdamW (fused on the GPU), which needs no build. false: DeepSpeed's FusedAdam, or its CPU Adam
    with offload_optimizer, compiled at first use (nvcc for FusedAdam on a GPU, else a C++ compiler), unless
    DeepSpeed was installed with them prebuilt (DS_BUILD_OPS=1); preflight checks that it can be loaded."""
    config_file: str | None = None
    """A DeepSpeed JSON used as-is for the Trainer-based stages (overrides the keys above)."""
    actor: ZeroRoleCfg = field(default_factory=ZeroRoleCfg)
    """PPO actor overrides."""
    critic: ZeroRoleCfg = field(default_factory=ZeroRoleCfg)
    """PPO critic overrides."""
    ref: ZeroRoleCfg = field(default_factory=ZeroRoleCfg)
    """PPO frozen reference overrides (inference only)."""
    reward: ZeroRoleCfg = field(default_factory=ZeroRoleCfg)
    """PPO frozen reward model overrides (inference only)."""

    def __post_init__(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        require(not self.offload_param or self.zero_stage == 3, "offload_param", "needs zero_stage 3")

    def role(self, name: str) -> ZeroRoleCfg:
        """Settings for one PPO role with inherited values filled in."""
        own = getattr(self, name)
        return ZeroRoleCfg(
            zero_stage=self.zero_stage if own.zero_stage is None else own.zero_stage,
            offload_param=self.offload_param if own.offload_param is None else own.offload_param,
            offload_optimizer=self.offload_optimizer if own.offload_optimizer is None else own.offload_optimizer,
        )


@dataclass
class LoggingCfg:
    tensorboard: bool = True
    """Write TensorBoard event files under each stage's `logs/`."""
    jsonl: bool = True
    """Write metrics to `metrics.jsonl` in each stage dir."""
    progress: bool = True
    """Show progress bars."""
    plots: bool = True
    """Write PNG plots of training curves at the end of each stage."""
    report_to: str | list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where metrics go besides `metrics.jsonl`: any of tensorboard, wandb, mlflow, trackio. Every one gets
    the same metric names and steps, from the main rank only, one run per stage (`rlhf.trackers`). W&B
    reads WANDB_* (WANDB_MODE=offline works), MLflow MLFLOW_TRACKING_URI, trackio TRACKIO_DIR / a Space."""
    project: str = "rlhf"
    """The W&B / trackio project, or MLflow experiment, that the stage runs are logged under."""

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        unknown = [name for name in self.report_to if name not in REPORT_TO]
        require(not unknown, "report_to", f"unknown {', '.join(map(repr, unknown))}; choose from "
                 f"{', '.join(REPORT_TO)}")
        require(bool(self.project.strip()), "project", "must be a non-empty name")

    @property
    def writes_tensorboard(self) -> bool:
        """TensorBoard events are written: `tensorboard` in report_to, and not switched off by `tensorboard`."""
        return self.tensorboard and "tensorboard" in self.report_to


REPORT_TO = ("tensorboard", "wandb", "mlflow", "trackio")


@dataclass
class PipelineConfig:
    run: RunCfg = field(default_factory=RunCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    sft: SFTCfg = field(default_factory=SFTCfg)
    reward: RewardCfg = field(default_factory=RewardCfg)
    final_stage: Literal["ppo", "dpo", "orpo"] | None = None
    ppo: PPOCfg = field(default_factory=PPOCfg)
    dpo: DPOCfg = field(default_factory=DPOCfg)
    orpo: ORPOCfg = field(default_factory=ORPOCfg)
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)
    logging: LoggingCfg = field(default_factory=LoggingCfg)

    # Not config keys: where the config came from and which sections the file spelled out.
    source: str = field(default="<defaults>", repr=False, compare=False, metadata={"internal": True})
    present: tuple[str, ...] = field(default=(), repr=False, compare=False, metadata={"internal": True})

    @property
    def stages(self) -> list[str]:
        """Stages this file runs, in order.

        `final_stage: ppo` runs sft, reward, ppo (no reward stage when the ppo stage reads nothing of it:
        `PPOCfg.needs_reward_stage`; no sft stage with `ppo.policy_init: base`); `dpo` runs sft, dpo; `orpo` runs orpo alone (it trains from
        the base model). Without `final_stage`, the `sft` and `reward` sections present run, which is how a
        reward-model-only file says what it wants.
        """
        if self.final_stage == "ppo":
            return ([*(["sft"] if self.ppo.policy_init == "sft" else []),
                     *(["reward"] if self.ppo.needs_reward_stage else []), "ppo"])
        if self.final_stage == "dpo":
            return ["sft", "dpo"]
        if self.final_stage == "orpo":
            return ["orpo"]
        return [s for s in ("sft", "reward") if s in self.present]

    def stage_dir(self, stage: str) -> Path:
        return self.run.dir / stage

    def to_dict(self) -> dict[str, Any]:
        return coerce.dump(self)

    def hash(self, sections: tuple[str, ...] | None = None) -> str:
        """Short content hash of the given sections (all when None), for stage manifests."""
        full = self.to_dict()
        picked = full if sections is None else {k: full[k] for k in sections}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- what a stage's weights depend on

# Keys that change how a stage runs but not the weights it produces. A stage resumes from its checkpoints,
# or counts as complete, under a config that differs from the one that trained it only in these (one INFO
# line names them); any other difference in `stage_settings` is refused (`rlhf.stages.common`), but for
# GROWING_STEPS below. A key not listed here counts as changing the result. Patterns as in fnmatch: `*` is
# any section.
RUN_ONLY_KEYS = (
    # Where the run lives, and how long to wait for a claim or a collective.
    "run.name", "run.output_dir", "run.claim_timeout_s", "run.collective_timeout_s",
    # Guards: whether a bad step or a KL blow-up stops the run, not what a good step computes.
    "run.on_nonfinite", "run.max_consecutive_skips", "ppo.kl_ceiling",
    # Permissions: what may be loaded, not what is.
    "model.trust_remote_code", "model.allow_pickle",
    # Logging, checkpoint and evaluation cadence; the evaluation batch.
    "logging.*", "*.logging_steps", "*.save_steps", "*.save_total_limit", "*.eval_steps", "*.eval_batch_size",
    "ppo.sample_every",
    # How a reward server is reached and waited for, not what it scores (its url is what it scores).
    "ppo.rewards.*.token_env", "ppo.rewards.*.timeout_s", "ppo.rewards.*.retries",
    # The same maths with other kernels, memory trades or placement: results equal up to rounding.
    "*.gradient_checkpointing", "ppo.generation", "ppo.reuse_rollout_forward",
    "deepspeed.enabled", "deepspeed.zero_stage", "deepspeed.offload_optimizer", "deepspeed.offload_param",
    "deepspeed.torch_adam", "deepspeed.actor.*", "deepspeed.critic.*", "deepspeed.ref.*", "deepspeed.reward.*",
)
# A step count that may be raised on resume, to no fewer steps than the weights on disk have had: no PPO step
# depends on `ppo.steps` (constant learning rates, nothing scheduled over the run), so the first N steps of a
# longer run are those of an N-step run. A Trainer stage's learning-rate schedule spans its max_steps (or
# epochs), so a changed count changes every step: it counts as changing the result.
GROWING_STEPS = {"ppo": "ppo.steps"}


def is_run_only(key: str) -> bool:
    """`key` (dotted, as in `stage_settings`) is one of RUN_ONLY_KEYS."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RUN_ONLY_KEYS)


def stage_settings(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The settings of one stage's run, as `dotted.key: value`: its own section, `run`, `model`, `deepspeed`
    and `logging` whole, and of `data` what the stage reads (its source after the fallbacks of
    `rlhf.data.stage_rows.data_source`, each source with its own key mapping; that kind's held-out source;
    how rows are read, split and cut). Other stages' sections are left out: an earlier stage's output is an
    input here, checked when that stage runs. RUN_ONLY_KEYS says which of these leave the weights alone."""
    from rlhf.data.stage_rows import EVAL_KEY, data_source  # rlhf.data is light, but loads after this module

    full = cfg.to_dict()
    _, source_key, kind = data_source(cfg, stage)
    # PPO cuts prompts at max_prompt_length; the other stages cut whole rows at max_length.
    length_key = "max_prompt_length" if stage == "ppo" else "max_length"
    data_keys = (source_key.removeprefix("data."), EVAL_KEY[kind], "split", "eval_fraction", "bad_rows", length_key)
    settings = _flatten({name: full[name] for name in ("run", "model", "deepspeed", "logging", stage)})
    return {**settings, **{f"data.{key}": full["data"][key] for key in data_keys}}  # a source is one value


def changed_settings(trained: PipelineConfig, new: PipelineConfig, stage: str,
                     trained_step: int | None = None) -> tuple[list[str], list[str]]:
    """The keys of `stage_settings` whose values differ between the config that trained a stage and a new
    one, sorted, as (keys that change the weights trained so far, keys that leave them alone). The second
    group holds RUN_ONLY_KEYS, and the stage's GROWING_STEPS key when the new count is at least
    `trained_step`, the step of the weights on disk."""
    old, now = stage_settings(trained, stage), stage_settings(new, stage)
    changed = sorted(key for key in old.keys() | now.keys() if old.get(key, _UNSET) != now.get(key, _UNSET))

    def harmless(key: str) -> bool:
        if key == GROWING_STEPS.get(stage):
            return trained_step is not None and now[key] >= trained_step
        return is_run_only(key)

    return [k for k in changed if not harmless(k)], [k for k in changed if harmless(k)]


_UNSET = object()  # a key only one of two configs has


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`a.b.c: value` for a nested mapping; a list of mappings (`ppo.rewards`) by position (`ppo.rewards.0.url`)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for i, item in enumerate(value):
                out.update(_flatten(item, f"{prefix}{key}.{i}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, merge `--set` overrides into, and validate a pipeline YAML file."""
    return config_from_dict(coerce.read_mapping(path), source=str(Path(path)), overrides=overrides)


def config_from_dict(raw: dict, source: str = "<dict>", overrides: list[str] | None = None) -> PipelineConfig:
    """Validate a config mapping (as read from YAML) into a `PipelineConfig`.

    Every problem of the file is reported at once: the ConfigError holds one line per problem.
    """
    present = tuple(k for k in raw if isinstance(k, str))  # a key of another type is an unknown key
    cfg = coerce.build(PipelineConfig, raw, source=source, overrides=overrides,
                       override_example="sft.learning_rate=1e-5")
    cfg.source = source
    cfg.present = present
    return cfg


def save_resolved(cfg: PipelineConfig, path: str | Path) -> None:
    """Write the fully resolved config (every default filled in) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
