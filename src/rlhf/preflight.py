"""Checks that run before any stage spends compute, and before any model weights load.

Each problem is a typed `Blocker` printed as one line. `rlhf preflight` exits 2 when any is found; every
stage runs the same checks for itself first.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf import artifacts, trackers
from rlhf.config import PipelineConfig, RunCfg
from rlhf.data.stage_rows import data_source
from rlhf.errors import ConfigError, RlhfError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("rlhf")
# Rows of each preference source read for the length-bias check (`data.verbosity`).
VERBOSITY_ROWS = 5000
# The blocker of a tracker of `logging.report_to` that could not start (`trackers.start_problem`).
TRACKER_CODES = {"wandb": "tracker.wandb_auth", "mlflow": "tracker.mlflow_store", "trackio": "tracker.trackio_dir"}
# Earlier stages whose outputs a stage reads.
STAGE_INPUTS = {"sft": (), "reward": (), "ppo": ("sft", "reward"), "dpo": ("sft",), "orpo": ()}


@dataclass(frozen=True)
class Blocker:
    code: str
    """Stable identifier, e.g. `data.missing`, `model.not_found`, `stage.input_missing`."""
    message: str
    """One line: names the file, key or path, and says what to do."""

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


def check(cfg: PipelineConfig, stages: list[str] | None = None, *, standalone: bool = False) -> list[Blocker]:
    """All blockers for running `stages` (default: the file's pipeline).

    standalone=True means each stage is started on its own, so the outputs of earlier stages must
    already exist; in a pipeline run they are produced on the way.
    """
    from rlhf import engine

    stages = cfg.stages if stages is None else stages
    if "ppo" in stages and not cfg.ppo.needs_reward_stage:
        _say_no_reward_stage(cfg)
    blockers: list[Blocker] = []
    if not stages:
        blockers.append(Blocker("config.no_stages", f"{cfg.source}: nothing to run; set final_stage (ppo, dpo or "
                                "orpo) or add an `sft` or `reward` section"))
    tokenizer = _verbosity_tokenizer(cfg, stages)
    for stage in stages:
        data_blockers = _check_data(cfg, stage)
        blockers += data_blockers if data_blockers else _check_verbosity(cfg, stage, blockers, tokenizer)
        blockers += _check_inputs(cfg, stage, planned=[] if standalone else stages[: stages.index(stage)])
    blockers += _check_models(cfg, stages)
    device = engine.device(cfg.run.device)  # decided once for the checks that depend on it
    blockers += check_device(cfg, device)
    blockers += _check_packages(cfg, stages)
    blockers += check_optimizer_ops(cfg, stages, device)
    blockers += _check_output(cfg)
    if not blockers:
        blockers += check_fit(cfg, os.environ)
    if launch_env(os.environ) and "LOCAL_RANK" not in os.environ:  # before a launch, not inside one
        blockers += check_launch(os.environ, run_dir=cfg.run.dir, max_age_s=cfg.run.collective_timeout_s)
    return blockers


def _say_no_reward_stage(cfg: PipelineConfig) -> None:
    """One INFO line: why a ppo pipeline has no reward stage (`PPOCfg.needs_reward_stage`)."""
    scores = "ppo.reward_fn scores" if cfg.ppo.reward_fn else "ppo.rewards has no reward_model source"
    critic = (f"ppo.advantage: {cfg.ppo.advantage} has no critic" if not cfg.ppo.uses_critic
              else "the critic starts from the SFT model (ppo.critic_init: sft)")
    log.info("%s: reward stage not needed: %s and %s; the pipeline skips it", cfg.source, scores, critic)


def _check_data(cfg: PipelineConfig, stage: str) -> list[Blocker]:
    from rlhf import data

    path, key, kind = data_source(cfg, stage)
    if path is None:
        need = "preference pairs (prompt, chosen, rejected)" if kind == "preference" else f"{kind} data"
        return [Blocker("data.not_set", f"{cfg.source}: {key} is not set; the {stage} stage needs {need}")]
    out = []
    for source in (path, _eval_source(cfg, key)):
        if source is None:
            continue
        try:
            data.check_source(source, kind, split=cfg.data.split, bad_rows=cfg.data.bad_rows)
        except RlhfError as err:
            out.append(Blocker("data.invalid", f"{stage}: {err}"))
    return out


def _verbosity_tokenizer(cfg: PipelineConfig, stages: list[str]):
    """The policy's tokenizer when a stage's length-bias check will run and it is on this machine
    (`data.report.policy_tokenizer`), so preflight counts what `rlhf data inspect` counts; else None (words)."""
    from rlhf.data.report import policy_tokenizer

    checked = cfg.data.verbosity != "off" and any(data_source(cfg, s)[2] == "preference" for s in stages)
    return policy_tokenizer(cfg) if checked else None


def _check_verbosity(cfg: PipelineConfig, stage: str, earlier: list[Blocker], tokenizer) -> list[Blocker]:
    """Length bias of a preference stage's training pairs (`rlhf.verbosity`, over the first `VERBOSITY_ROWS`
    rows of each source, in the policy's tokens or, without its tokenizer here, in words): logged as a
    warning, or a blocker with `data.verbosity: block`. A source another stage of the same check already
    reported is not reported again."""
    from rlhf import data, verbosity

    path, key, kind = data_source(cfg, stage)
    if kind != "preference" or cfg.data.verbosity == "off":
        return []
    out = []
    for part in data.parts(path):
        report = data.inspect(part, split=cfg.data.split, kind=kind, tokenizer=tokenizer, n_examples=0,
                              limit=VERBOSITY_ROWS, streaming=True)
        for warning in verbosity.warnings(report.length_bias):
            message = f"{cfg.source}: {key} ({part.path}): {warning}"
            if cfg.data.verbosity == "block":
                blocker = Blocker("data.verbosity", f"{message}; rebalance the pairs or set data.verbosity: warn")
                out += [] if blocker in earlier else [blocker]
            elif message not in _WARNED:
                _WARNED.add(message)
                log.warning("%s (data.verbosity: block makes this a blocker)", message)
    return out


_WARNED: set[str] = set()  # each warning once per process, though every stage runs preflight


def _eval_source(cfg: PipelineConfig, key: str) -> str | None:
    return getattr(cfg.data, key.split(".")[-1] + "_eval", None)


def _check_inputs(cfg: PipelineConfig, stage: str, planned: list[str]) -> list[Blocker]:
    out = []
    needed = list(STAGE_INPUTS[stage])
    if stage == "reward" and cfg.reward.base_model is None and "sft" in cfg.present:
        needed.append("sft")
    if stage == "ppo" and not cfg.ppo.needs_reward_stage:
        needed.remove("reward")  # a Python reward, and no critic or an SFT-initialised one
    if stage == "ppo" and cfg.ppo.policy_init == "base":
        needed.remove("sft")  # the actor starts from model.name_or_path
    for earlier in needed:
        if earlier in planned:
            continue
        try:
            artifacts.stage_output(cfg.stage_dir(earlier), earlier, needed_by=f"the {stage} stage",
                                   config_path=cfg.source)
        except RlhfError as err:
            out.append(Blocker("stage.input_missing", str(err)))
    return out


def _check_models(cfg: PipelineConfig, stages: list[str]) -> list[Blocker]:
    from rlhf import models

    names = [("model.name_or_path", cfg.model.name_or_path)]
    if "reward" in stages and cfg.reward.base_model:
        names.append(("reward.base_model", cfg.reward.base_model))
    out = []
    for key, name in names:
        problem = models.check_resolvable(name, allow_pickle=cfg.model.allow_pickle)
        if problem:
            out.append(Blocker("model.unusable", f"{cfg.source}: {key}: {problem}"))
    return out


def check_device(cfg: PipelineConfig, device: torch.device) -> list[Blocker]:
    """The run's device (`engine.device(cfg.run.device)`) and dtype: `run.device: cuda` needs a GPU torch can
    see (never a silent CPU run), bf16 needs a GPU that has it, and fp16 trains only with DeepSpeed's loss
    scaling."""
    import torch

    from rlhf import engine

    out = []
    on_gpu = device.type == "cuda"
    dtype = engine.run_dtype(cfg, device)
    if cfg.run.device == "cuda" and not on_gpu:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        out.append(Blocker("device.no_cuda", f"{cfg.source}: run.device is cuda but torch sees no CUDA GPU "
                           f"(torch {torch.__version__}, {build}); install a CUDA build of torch, check "
                           "CUDA_VISIBLE_DEVICES, or set run.device: auto"))
    if on_gpu and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        out.append(Blocker("device.no_bf16", f"{cfg.source}: model.dtype is bfloat16 but "
                           f"{torch.cuda.get_device_name(device)} has no bfloat16; "
                           "set model.dtype: float16 (DeepSpeed's loss scaling) or float32"))
    if on_gpu and dtype == "float16" and not engine.use_deepspeed(cfg.deepspeed):
        out.append(Blocker("device.fp16_plain", f"{cfg.source}: model.dtype float16 trains only under DeepSpeed, "
                           "whose loss scaling keeps small gradients from vanishing; start the stages with a "
                           "launcher (stages/*.sh with NUM_GPUS) or set deepspeed.enabled: true, or use bfloat16"))
    return out


def _check_packages(cfg: PipelineConfig, stages: list[str]) -> list[Blocker]:
    from rlhf import engine

    out = []
    if engine.use_deepspeed(cfg.deepspeed) and importlib.util.find_spec("deepspeed") is None:
        out.append(Blocker("package.missing", "deepspeed is not installed but DeepSpeed is on (launcher or "
                           "deepspeed.enabled); `pip install deepspeed` or set deepspeed.enabled: false"))
    if cfg.model.lora.enabled and importlib.util.find_spec("peft") is None:
        out.append(Blocker("package.missing", "peft is not installed but model.lora.enabled is true; "
                           "`pip install peft`"))
    for name in trackers.missing(cfg.logging.report_to):
        out.append(Blocker("package.missing", f"{cfg.source}: logging.report_to has {name} but it is not installed; "
                           f"`pip install {trackers.PACKAGES[name]}` or remove it from logging.report_to"))
    for name in [n for n in cfg.logging.report_to if n in trackers.TRACKERS and not trackers.missing([n])]:
        problem = trackers.start_problem(name)  # at every stage's start too: `check_or_raise`
        if problem:
            out.append(Blocker(TRACKER_CODES[name], f"{cfg.source}: logging.report_to has {name}, but {problem}"))
    out += check_torch_version()
    if "ppo" in stages:
        out += _check_programs(cfg)
    return out


def check_torch_version() -> list[Blocker]:
    """The installed torch against the torch requirement transformers declares in its package metadata
    (its `torch` extra). Below it transformers quietly runs without torch (`is_torch_available()` is
    false), so no model loads and the errors name something else. Wheelhouses leave torch as it is."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    try:
        installed, transformers_version = version("torch"), version("transformers")
        declared = [Requirement(line) for line in requires("transformers") or []]
        torch_version = Version(installed)
    except (PackageNotFoundError, InvalidRequirement, InvalidVersion):
        return []  # a missing package fails at its import with its own message
    specs = [r.specifier for r in declared
             if r.name == "torch" and (r.marker is None or r.marker.evaluate({"extra": "torch"}))]
    if not specs or specs[0].contains(torch_version, prereleases=True):
        return []
    return [Blocker("package.torch_too_old", f"torch {installed} does not meet transformers {transformers_version}'s "
                    f"requirement torch{specs[0]}: transformers then runs without torch and no model loads; install "
                    f"torch{specs[0]} (on a GPU machine the CUDA build for its driver) or a transformers release "
                    f"that supports torch {installed}")]


def check_optimizer_ops(cfg: PipelineConfig, stages: list[str], device: torch.device) -> list[Blocker]:
    """Under DeepSpeed with its compiled optimizer asked for (`deepspeed.torch_adam: false`, or a DeepSpeed
    file's Adam block with `torch_adam: false`), the op each stage would load (`engine.compiled_optimizer_ops`:
    FusedAdam, or CPU Adam with the optimizer offloaded) must be prebuilt or buildable here. Builds nothing."""
    from rlhf import engine

    if not engine.use_deepspeed(cfg.deepspeed) or importlib.util.find_spec("deepspeed") is None:
        return []  # a missing deepspeed is reported by _check_packages
    try:
        ops = engine.compiled_optimizer_ops(cfg, stages, device)
    except RlhfError as err:
        return [Blocker("deepspeed.config_file", str(err))]
    on_gpu = device.type == "cuda"
    out = []
    for op, asked_by in ops.items():
        gpu_op = on_gpu and op != "CPUAdamBuilder"  # CPU Adam runs on the host wherever the model is
        builder = _op_builder(op, on_gpu)
        problem = f"DeepSpeed has no {op} here" if builder is None else op_problem(builder, gpu_op=gpu_op)
        if problem:
            tool = "a CUDA toolkit (nvcc) matching torch's CUDA" if gpu_op else "a C++ compiler"
            out.append(Blocker("deepspeed.op_unavailable", f"{cfg.source}: {asked_by} makes DeepSpeed load its "
                               f"compiled {op.removesuffix('Builder')} optimizer, but {problem}; set "
                               f"deepspeed.torch_adam: true (torch's AdamW, nothing to build), or install {tool} "
                               "or a DeepSpeed built with its ops (DS_BUILD_OPS=1)"))
    return out


def _op_builder(name: str, on_gpu: bool):
    """DeepSpeed's op builder `name` for the run's accelerator (None if it has none); nothing is built."""
    # DeepSpeed picks its accelerator once, when first imported: the same choice engine.wrap makes
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().create_op_builder(name)


def _prebuilt(builder) -> bool:
    """Whether this DeepSpeed install ships `builder`'s op compiled for the accelerator in use (the first
    thing `OpBuilder.load` checks, with the same comparison)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    return bool(installed_ops.get(builder.name)) and accelerator_name == get_accelerator()._name


def op_problem(builder, *, gpu_op: bool) -> str | None:
    """Why DeepSpeed can neither load `builder`'s op prebuilt nor JIT-build it here; None when it can.
    Checks what the build needs without running it: the builder's own compatibility probe, ninja, a C++
    compiler (`CXX`, else `c++`), and for a CUDA op nvcc under torch's CUDA_HOME."""
    import torch.utils.cpp_extension as cpp

    if _prebuilt(builder):
        return None
    try:
        compatible = builder.is_compatible(verbose=False)
    except Exception as err:  # DeepSpeed's probes raise for a missing toolkit; it reads that as "no" too
        compatible, builder.error_log = False, str(err)
    if not compatible:
        why = getattr(builder, "error_log", None) or "its compatibility check failed"
        return f"it is not prebuilt and cannot be built for this machine ({why})"
    missing = [] if cpp.is_ninja_available() else ["ninja (`pip install ninja`)"]
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx} is not on PATH)")
    if gpu_op:
        nvcc = Path(cpp.CUDA_HOME) / "bin" / "nvcc" if cpp.CUDA_HOME else None
        if nvcc is None or not os.access(nvcc, os.X_OK):
            missing.append(f"nvcc ({nvcc} is missing)" if nvcc else "nvcc (no CUDA toolkit: CUDA_HOME is not set)")
    return f"it is not prebuilt and building it needs {' and '.join(missing)}" if missing else None


def _check_programs(cfg: PipelineConfig) -> list[Blocker]:
    """Every program among the reward's sources imports and is callable (`programs.load_program`), and every
    reward server answers `/health` (`_check_server`), before any weights load."""
    from rlhf.programs import load_program

    key = "ppo.reward_fn" if cfg.ppo.reward_fn else "ppo.rewards"
    out = []
    for source in cfg.ppo.reward_sources:
        if source.url is not None:
            out += _check_server(cfg, source)
        elif source.is_program:
            try:
                load_program(source.source, key)
            except ConfigError as err:
                out.append(Blocker(key, f"{cfg.source}: {err}"))
    return out + _check_remote_critic(cfg)


def _check_server(cfg: PipelineConfig, source) -> list[Blocker]:
    """The reward server of a `url` source answers `GET /health` within its `timeout_s`, with its token."""
    from rlhf.remote_reward import RemoteRewardError, RemoteScorer

    try:
        RemoteScorer(source.url, token_env=source.token_env, timeout_s=source.timeout_s,
                     protocol=source.protocol).health()
    except RemoteRewardError as err:
        return [Blocker("reward.server", f"{cfg.source}: ppo.rewards: the reward server at {source.url} failed its /health "
                        f"check ({err.reason}); start it (rlhf serve --model ...), fix the url or its token_env")]
    except RlhfError as err:
        return [Blocker("reward.server", f"{cfg.source}: {err}")]
    return []


def _check_remote_critic(cfg: PipelineConfig) -> list[Blocker]:
    """A critic initialised from the reward model (`ppo.critic_init: reward`) reads that model's weights from
    the reward stage's output, which a run scored by a reward server alone may not have here."""
    ppo = cfg.ppo
    servers = [r.url for r in ppo.reward_sources if r.url is not None]
    if not servers or ppo.needs_reward_model or not (ppo.uses_critic and ppo.critic_init == "reward"):
        return []
    try:
        artifacts.stage_output(cfg.stage_dir("reward"), "reward", needed_by="the ppo stage's critic",
                               config_path=cfg.source)
    except RlhfError:
        return [Blocker("reward.critic_init", f"{cfg.source}: ppo.critic_init: reward starts the critic from the "
                        f"reward model's weights, but the reward model is served at {servers[0]} and its weights are "
                        f"not under {cfg.stage_dir('reward')}; set ppo.critic_init: sft, use a critic-free "
                        "ppo.advantage (grpo, rloo, ...), or copy the reward stage's output there")]
    log.info("%s: the critic starts from %s (ppo.critic_init: reward); the scores come from %s", cfg.source,
             cfg.stage_dir("reward"), ", ".join(servers))
    return []


def _check_output(cfg: PipelineConfig) -> list[Blocker]:
    run_dir = cfg.run.dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        return [Blocker("output.unwritable", f"{run_dir}: output dir is not writable ({err.strerror}); "
                        "set run.output_dir to a writable place")]
    return []


def format_blockers(blockers: list[Blocker]) -> str:
    return "\n".join(f"blocked: {b}" for b in blockers)


def check_or_raise(cfg: PipelineConfig, stages: list[str], *, standalone: bool) -> None:
    """Used by every stage before it loads anything heavy."""
    blockers = check(cfg, stages, standalone=standalone)
    if blockers:
        raise PreflightError(blockers)


class PreflightError(RlhfError):
    def __init__(self, blockers: list[Blocker]):
        super().__init__(format_blockers(blockers))
        self.blockers = blockers


# --------------------------------------------------------------------------- launches (stages/lib.sh modes)

LAUNCH_VARS = ("NNODES", "HOSTFILE", "NUM_GPUS", "LAUNCHER", "MASTER_ADDR")
VERSION_PACKAGES = ("rlhf", "torch", "transformers", "trl", "deepspeed", "accelerate", "peft", "datasets")


def launch_env(env) -> bool:
    """True when stages/lib.sh would start a launcher (any of its variables is set)."""
    return any(env.get(k) for k in LAUNCH_VARS)


def check_fit(cfg: PipelineConfig, env) -> list[Blocker]:
    """Blocks a launch whose estimated peak (rlhf.plan) exceeds `RLHF_GPU_MEM_GIB`. Without it (CPU runs,
    or unknown GPUs) nothing is checked. Ranks: NUM_GPUS x NNODES, or WORLD_SIZE inside a launcher."""
    gib = env.get("RLHF_GPU_MEM_GIB")
    if not gib or not cfg.stages:
        return []
    from rlhf import plan

    gpus, nodes = int(env.get("NUM_GPUS") or 1), int(env.get("NNODES") or 1)
    if "WORLD_SIZE" in env:
        gpus, nodes = int(env["WORLD_SIZE"]), 1
    try:
        problem = plan.fit_problem(cfg, gpus=gpus, nodes=nodes, gpu_mem_gib=float(gib))
    except (RlhfError, ValueError, OSError) as err:  # unknown architecture: the model check reports it
        return [Blocker("plan.unknown", f"RLHF_GPU_MEM_GIB is set but the memory plan failed: {err}")]
    return [Blocker("plan.no_fit", problem)] if problem else []


def check_launch(env, *, run_dir: str | Path | None = None,
                 max_age_s: float = RunCfg.collective_timeout_s) -> list[Blocker]:
    """Multi-node checks, run on each node before it launches (`rlhf preflight` with the launch env).

    - HOSTFILE: the file exists and every host in it resolves.
    - MASTER_ADDR/MASTER_PORT (NNODES, torchrun, HOSTFILE, NUM_GPUS): on the master node (NODE_RANK 0, or a
      single-node launch) the port must be free to bind as the launch's store binds it (a port that a
      finished run's connections still hold in TIME_WAIT is free); on the other nodes MASTER_ADDR must
      resolve and answer on the port or refuse it (a refusal proves the host is reachable; rank 0 may not
      be up yet); a timeout or "no route" blocks.
    - NNODES: package versions equal on every node, see `check_versions` (`max_age_s`: how far apart the
      nodes of one launch may start, `run.collective_timeout_s`).
    """
    out: list[Blocker] = []
    hostfile = env.get("HOSTFILE")
    if hostfile:
        out += _check_hostfile(Path(hostfile))
    port = int(env.get("MASTER_PORT") or 29500)
    addr = env.get("MASTER_ADDR") or "127.0.0.1"
    node_rank = int(env.get("NODE_RANK") or 0)
    if node_rank == 0:
        out += _check_port_free(port)
    else:
        out += _check_reachable(addr, port)
    if env.get("NNODES") and int(env["NNODES"]) > 1:
        where = env.get("RLHF_VERSIONS_DIR") or (Path(run_dir) / "launch" if run_dir else None)
        out += check_versions(where, node_rank, int(env["NNODES"]), reference=env.get("RLHF_VERSIONS_FILE"),
                              launch=launch_id(env), max_age_s=max_age_s)
    return out


def _check_hostfile(path: Path) -> list[Blocker]:
    if not path.is_file():
        return [Blocker("launch.hostfile", f"HOSTFILE={path}: no such file")]
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        host = line.split("#", 1)[0].split()
        if not host:
            continue
        try:
            socket.getaddrinfo(host[0], None)
        except OSError as err:
            out.append(Blocker("launch.host_unresolvable", f"{path}:{lineno}: host '{host[0]}' does not resolve "
                               f"({err}); fix /etc/hosts or DNS, or use the node's IP"))
    return out


def _check_port_free(port: int) -> list[Blocker]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As torch's TCPStore binds: SO_REUSEADDR lets a port whose last connections are in TIME_WAIT (about
        # a minute after a run ends) be bound again, while a live listener on it still refuses the bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as err:
            return [Blocker("launch.port_busy", f"MASTER_PORT={port} is in use on this (master) node ({err.strerror}); "
                            "pick another with MASTER_PORT=<free port> on every node")]
    return []


def _check_reachable(addr: str, port: int, timeout: float = 3.0) -> list[Blocker]:
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except OSError as err:
        return [Blocker("launch.master_unresolvable", f"MASTER_ADDR={addr} does not resolve on this node ({err})")]
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except ConnectionRefusedError:
            return []  # the host answered; rank 0 has not opened the port yet
        except OSError as err:
            return [Blocker("launch.master_unreachable", f"MASTER_ADDR={addr}:{port} is not reachable from this node "
                            f"({err.strerror or err}); check the network/firewall between the nodes")]
    return []


def package_versions() -> dict[str, str]:
    """Versions of the packages every node must agree on, plus Python's."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def launch_id(env) -> str | None:
    """The scheduler job run this launch belongs to, the same on every node, or None outside a job: Slurm's
    job, restart count and step (`slurm:5001.0.3`; each srun is a step of its own), or `RLHF_JOB_ID` and
    `RLHF_JOB_RESTART` for any other scheduler (these win, as for claims: `rlhf.claims`)."""
    def part(key: str) -> str:
        return env.get(key, "").strip()

    if part("RLHF_JOB_ID"):
        return f"job:{part('RLHF_JOB_ID')}.{part('RLHF_JOB_RESTART') or '0'}"
    if part("SLURM_JOB_ID"):
        return f"slurm:{part('SLURM_JOB_ID')}.{part('SLURM_RESTART_COUNT') or '0'}.{part('SLURM_STEP_ID')}"
    return None


def check_versions(where: str | Path | None, node_rank: int, nnodes: int, *, reference: str | None = None,
                   launch: str | None = None, max_age_s: float = RunCfg.collective_timeout_s) -> list[Blocker]:
    """Same package versions on every node.

    Each node writes `<where>/versions-node<NODE_RANK>.json` (default `where`: `<run dir>/launch/`, so on a
    shared filesystem every node sees the others) and compares itself with every file already there; the
    last node to start catches a difference. Only files of this launch count, so a node fixed since an
    earlier launch is not judged by its old file: under a scheduler job (`launch`, see `launch_id`) those
    of the same job step; outside one, those written in the last `max_age_s` seconds (the nodes of one
    launch must join it within `run.collective_timeout_s`, or it fails). Files of node ranks >= NNODES
    (left by a larger earlier launch) are ignored too. Without a shared filesystem, copy one node's file to
    the others and name it with RLHF_VERSIONS_FILE (checked as well, whatever its age).
    """
    mine = package_versions()
    others: list[tuple[str, dict]] = []
    if reference:
        try:
            others.append((reference, json.loads(Path(reference).read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError) as err:
            return [Blocker("launch.versions", f"RLHF_VERSIONS_FILE={reference}: unreadable ({err})")]
    if where is not None:
        where = Path(where)
        own = where / f"versions-node{node_rank}.json"
        try:
            artifacts.write_json_atomic(own, {**mine, "host": socket.gethostname(), "launch": launch,
                                              "written": time.time()})
        except OSError as err:
            return [Blocker("launch.versions", f"{own}: cannot write this node's versions ({err})")]
        for rank in range(nnodes):
            path = where / f"versions-node{rank}.json"
            if rank != node_rank and path.is_file():
                theirs = json.loads(path.read_text(encoding="utf-8"))
                if _same_launch(theirs, launch, max_age_s):
                    others.append((str(path), theirs))
                else:
                    log.debug("%s: written by an earlier launch, not compared", path)
    out = []
    for source, theirs in others:
        diff = [f"{k} {mine[k]} here vs {theirs.get(k)}" for k in mine if theirs.get(k, mine[k]) != mine[k]]
        if diff:
            host = theirs.get("host", "?")
            out.append(Blocker("launch.version_mismatch", f"node{node_rank} ({socket.gethostname()}) and {source} "
                               f"(host {host}) differ: {'; '.join(diff)}; install the same versions everywhere "
                               "(the Docker image pins them)"))
    return out


def _same_launch(info: dict, launch: str | None, max_age_s: float) -> bool:
    """Whether a versions file (`info`) was written by this launch: the same job step, or with no job on
    either side, written in the last `max_age_s` seconds."""
    if info.get("launch") != launch:
        return False
    written = info.get("written")
    return launch is not None or (isinstance(written, (int, float)) and time.time() - written <= max_age_s)
