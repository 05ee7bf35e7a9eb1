"""`rlhf export`: any complete checkpoint of any stage -> a plain HF model dir with its tokenizer.

What the stages write under `<run>/<stage>/checkpoints/checkpoint-<step>/`, and how it is read:
- Trainer stages (sft, reward, dpo, orpo): a `save_pretrained` dir (config.json, model*.safetensors and
  the tokenizer), or a peft adapter dir with LoRA (adapter_config.json, adapter_model.safetensors; the
  base is the stage's input). Under DeepSpeed the Trainer also writes `global_step<N>/` shards; they are
  read only when the weights were not gathered at save time (a DeepSpeed file with
  `stage3_gather_16bit_weights_on_model_save: false`).
- PPO: `actor/` and `critic/` (`actor/` alone for a critic-free `ppo.advantage`), each `model.safetensors`
  (plain engine) or DeepSpeed's layout under the tag `state` (ZeRO 0-3), holding the whole module (a LoRA
  actor: base and adapters). The model is rebuilt from the stage's inputs (the sft stage's `final/`, and
  the reward stage's for a critic initialised from it) with the settings in the stage dir's
  `config.resolved.yaml`, then given the checkpoint's weights.

LoRA is merged by default; `adapter_only` keeps the adapter (with an absolute base path). The output holds
safetensors, JSON and tokenizer files only, written as `<out>.tmp-<pid>` and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlhf import artifacts, models
from rlhf.config import PipelineConfig
from rlhf.errors import ArtifactError, ConfigError, ModelError

log = logging.getLogger("rlhf")
ROLES = ("actor", "critic")
_STAGE_ROLE = {"sft": "policy", "reward": "reward", "dpo": "policy", "orpo": "policy"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass(frozen=True)
class Checkpoint:
    """One model of a complete checkpoint: `<run>/<stage>/checkpoints/checkpoint-<step>/[actor|critic]`."""

    path: Path
    """The checkpoint-<step> dir."""
    stage: str
    """sft | reward | ppo | dpo | orpo (the stage dir's name)."""
    role: str
    """policy | reward (Trainer stages), actor | critic (PPO)."""

    @property
    def step(self) -> int:
        return artifacts.checkpoint_step(self.path) or 0

    @property
    def stage_dir(self) -> Path:
        return self.path.parent.parent

    @property
    def run_dir(self) -> Path:
        return self.path.parents[2]

    @property
    def weights(self) -> Path:
        return self.path / self.role if self.stage == "ppo" else self.path

    @property
    def is_causal_lm(self) -> bool:
        return self.role in ("policy", "actor")


def find_checkpoint(path: str | Path, role: str | None = None) -> Checkpoint:
    """The checkpoint at `path` (`checkpoint-N`, or its `actor`/`critic` dir), checked complete; `role`
    picks PPO's actor (default) or critic. Every refusal is one line."""
    ckpt = Path(path).expanduser()
    if ckpt.name in ROLES and artifacts.checkpoint_step(ckpt.parent) is not None:  # also a role never saved
        if role not in (None, ckpt.name):
            raise ConfigError(f"--role {role}: {ckpt} is the PPO {ckpt.name}'s dir; drop --role or point to its parent")
        ckpt, role = ckpt.parent, ckpt.name
    if not ckpt.is_dir():
        raise ArtifactError(f"{ckpt}: no such checkpoint dir; point to <run>/<stage>/checkpoints/checkpoint-<step>")
    if artifacts.checkpoint_step(ckpt) is None or ckpt.parent.name != "checkpoints":
        raise _not_a_checkpoint(ckpt)
    if not (ckpt / artifacts.COMPLETE_MARKER).is_file():
        done = artifacts.list_checkpoints(ckpt.parent)
        if done and artifacts.checkpoint_step(done[-1]) > artifacts.checkpoint_step(ckpt):
            raise ArtifactError(f"{ckpt}: incomplete because it is being removed: the stage keeps only its last "
                                f"checkpoints and rotated this one away; export the newest, {done[-1]}")
        earlier = f"; complete ones: {', '.join(p.name for p in done)}" if done else "; there is no complete one"
        raise ArtifactError(f"{ckpt}: incomplete checkpoint (no {artifacts.COMPLETE_MARKER}: the run stopped while "
                            f"saving it){earlier}")
    stage = ckpt.parent.parent.name
    if stage == "ppo":
        role = role or "actor"
        if role not in ROLES:
            raise ConfigError(f"--role {role}: a PPO checkpoint holds the actor and the critic; use --role actor|critic")
    elif stage in _STAGE_ROLE:
        if role == "critic":
            raise ConfigError(f"--role critic: {ckpt} is a {stage} checkpoint; only PPO checkpoints hold a critic")
        if role == "actor" and stage == "reward":
            raise not_causal_lm(Checkpoint(ckpt, stage, "reward"))
        role = _STAGE_ROLE[stage]
    else:
        raise ArtifactError(f"{ckpt}: in a dir named {stage!r}, not a stage ({', '.join(artifacts.STAGE_MODEL_KIND)})")
    return Checkpoint(ckpt, stage, role)


def _not_a_checkpoint(path: Path) -> ArtifactError:
    """The refusal of a dir that is no checkpoint; a model dir (a stage's final/) or a stage dir is named as one."""
    where = "point to <run>/<stage>/checkpoints/checkpoint-<step>"
    if (path / artifacts.MANIFEST).is_file():
        return ArtifactError(f"{path}: a stage dir, not a checkpoint; its final/ is already a plain HF model dir "
                             f"(use it as it is, or copy it), or, for an earlier step, {where}")
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return ArtifactError(f"{path}: already a plain HF model dir, which needs no export: use it as it is, or "
                             f"copy it; to export a checkpoint, {where}")
    return ArtifactError(f"{path}: not a checkpoint dir; {where}")


def not_causal_lm(ckpt: Checkpoint) -> ModelError:
    if ckpt.role == "critic":
        return ModelError(f"{ckpt.weights}: the PPO critic (a scalar score head), not a causal LM; the policy is "
                          f"the actor, {ckpt.path / 'actor'}")
    return ModelError(f"{ckpt.path}: a reward-model checkpoint (a scalar score head), not a causal LM; use an sft, "
                      "ppo, dpo or orpo checkpoint")


def stage_config(ckpt: Checkpoint, config_path: str | None = None) -> PipelineConfig | None:
    """The settings the checkpoint was trained with: `config_path`, else the stage dir's config.resolved.yaml
    (written when the stage starts); None when neither exists."""
    from rlhf.config import load_config

    if config_path is not None:
        return load_config(config_path)
    resolved = ckpt.stage_dir / "config.resolved.yaml"
    return load_config(resolved) if resolved.is_file() else None


def _input_dir(ckpt: Checkpoint, stage: str) -> str:
    """`final/` of an earlier stage of the same run dir (found next to the checkpoint, so a moved run works)."""
    return str(artifacts.stage_output(ckpt.run_dir / stage, stage, needed_by=f"exporting {ckpt.path}"))


def _common(cfg: PipelineConfig | None) -> dict:
    """Loader settings: the run's trust_remote_code, allow_pickle and dtype (`auto` resolved as the run does)."""
    if cfg is None:
        return {"trust_remote_code": False, "allow_pickle": False, "dtype": "float32"}
    from rlhf import engine

    return {"trust_remote_code": cfg.model.trust_remote_code, "allow_pickle": cfg.model.allow_pickle,
            "dtype": engine.run_dtype(cfg, engine.device(cfg.run.device))}


def _load_weights(model, ckpt: Checkpoint) -> None:
    """Put what `engine.save_engine` wrote for this role into `model` (same structure: strict)."""
    from rlhf import engine

    where = ckpt.weights
    if (where / "model.safetensors").is_file():
        from safetensors.torch import load_model

        load_model(model, str(where / "model.safetensors"))  # strict, and tied weights saved once
        return
    if not (where / "state").is_dir():
        raise ArtifactError(f"{where}: no weights (model.safetensors or DeepSpeed's state/); the checkpoint is "
                            "incomplete")
    _load_state(model, engine.deepspeed_state_dict(where, tag="state"), where)


def _load_state(model, state: dict, where: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    problems = list(result.missing_keys) + list(result.unexpected_keys)
    if problems:
        raise ModelError(f"{where}: the saved weights do not fit the model rebuilt from the stage's inputs "
                         f"({len(problems)} keys differ, e.g. {problems[0]}); if the stage's settings changed since "
                         "this checkpoint, pass the config it was trained with (rlhf export --config FILE)")


def load_ppo(ckpt: Checkpoint, cfg: PipelineConfig | None):
    """(model, tokenizer, base dir) of a PPO actor or critic, rebuilt by `ppo_models.load_trained` (as the
    stage builds it) from this run dir's sft (and reward) outputs, then given the checkpoint's weights."""
    from rlhf import ppo_models

    if cfg is None:
        raise ConfigError(f"{ckpt.stage_dir}: no config.resolved.yaml, so the actor's and critic's settings (LoRA, "
                          f"critic_init) are unknown; pass the run's config: rlhf export --checkpoint {ckpt.path} "
                          "--config FILE --out DIR")
    if ckpt.role == "critic" and not cfg.ppo.uses_critic:
        raise ConfigError(f"{ckpt.path}: no critic to export: the run trained none (ppo.advantage: "
                          f"{cfg.ppo.advantage}); --role actor exports the policy")
    sft_dir = ppo_models.policy_start(cfg, ckpt.run_dir, needed_by=f"exporting {ckpt.path}")
    tokenizer = ppo_models.policy_tokenizer(cfg, sft_dir)
    reward_dir = _input_dir(ckpt, "reward") if ckpt.role == "critic" and cfg.ppo.critic_init == "reward" else None
    model, base = ppo_models.load_trained(ckpt.role, cfg, sft_dir, reward_dir, tokenizer, dtype=_common(cfg)["dtype"])
    if ckpt.role == "critic":
        from rlhf.forwards import ScalarHead

        _load_weights(ScalarHead(model), ckpt)  # the critic's engine trains (and saves) the model inside one
    else:
        _load_weights(model, ckpt)
    return model, tokenizer, base


def _adapter_base(ckpt: Checkpoint) -> str:
    """The base model of a Trainer LoRA checkpoint: adapter_config.json's, or, when that path (a run dir
    given relative to where the run started, or moved since) is not here, the same stage of this run dir."""
    base = _read_json(ckpt.path / "adapter_config.json").get("base_model_name_or_path") or ""
    parts = Path(base).parts
    if not Path(base).expanduser().is_dir() and len(parts) >= 2 and parts[-1] == "final":
        here = ckpt.run_dir / parts[-2] / "final"
        if here.is_dir():
            return str(here)
    if not base:
        raise ModelError(f"{ckpt.path / 'adapter_config.json'}: names no base model (base_model_name_or_path)")
    return base


def _has_tensors(file: Path) -> bool:
    """A safetensors file with at least one tensor (the Trainer leaves an empty adapter file when the
    weights live only in DeepSpeed shards)."""
    if not file.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return bool(list(handle.keys()))


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{file}: not readable JSON ({err}); the checkpoint is damaged") from None


def load_trainer(ckpt: Checkpoint, cfg: PipelineConfig | None):
    """(model, tokenizer, base dir or None) of a Trainer stage checkpoint (full weights or a LoRA adapter)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    common = _common(cfg)
    reward = ckpt.role == "reward"
    path = ckpt.path
    adapter = (path / "adapter_config.json").is_file()
    base = _adapter_base(ckpt) if adapter else None
    own_tokenizer = (path / "tokenizer_config.json").is_file()
    tokenizer = models.load_tokenizer(str(path) if own_tokenizer or base is None else base,
                                      trust_remote_code=common["trust_remote_code"])
    gathered = any(path.glob("model*.safetensors")) or _has_tensors(path / "adapter_model.safetensors")
    if adapter:
        from peft import PeftModel

        loader = models.load_scalar_model if reward else models.load_causal_lm
        extra = {"require_head": False} if reward else {}
        model = PeftModel.from_pretrained(loader(base, tokenizer=tokenizer, **extra, **common), str(path))
    elif gathered:
        common["dtype"] = _saved_dtype(path)
        model = (models.load_scalar_model(str(path), tokenizer=tokenizer, require_head=True, **common) if reward
                 else models.load_causal_lm(str(path), tokenizer=tokenizer, **common))
    else:  # config.json only: the weights are in the DeepSpeed shards
        auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
        import torch

        config = AutoConfig.from_pretrained(str(path), trust_remote_code=common["trust_remote_code"])
        model = auto.from_config(config, trust_remote_code=common["trust_remote_code"],
                                 dtype=getattr(torch, _saved_dtype(path)))
    if not gathered:
        from rlhf import engine

        _load_state(model, engine.deepspeed_state_dict(path), path)
    return model, tokenizer, base


def _saved_dtype(model_dir: Path) -> str:
    config = _read_json(model_dir / "config.json")
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def check_out(out: str | Path) -> Path:
    """`out` must not exist yet, or be an empty dir: an export never mixes with or replaces other files."""
    out = Path(out).expanduser()
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ConfigError(f"{out}: already exists and is not empty; choose a new --out dir or remove it")
    return out


def export(checkpoint: str | Path, out: str | Path, *, role: str | None = None, adapter_only: bool = False,
           config_path: str | None = None, causal_lm: bool = False) -> Path:
    """Write the model of `checkpoint` (see `find_checkpoint`) to `out` as a plain HF dir with its tokenizer.

    causal_lm: refuse a reward-model or critic checkpoint (for callers that generate text).
    adapter_only: keep a LoRA adapter as an adapter dir instead of merging it (refused without LoRA).
    """
    ckpt = find_checkpoint(checkpoint, role)
    if causal_lm and not ckpt.is_causal_lm:
        raise not_causal_lm(ckpt)
    out = check_out(out)
    cfg = stage_config(ckpt, config_path)
    files = _files(ckpt.path)
    try:
        model, tokenizer, base = (load_ppo if ckpt.stage == "ppo" else load_trainer)(ckpt, cfg)
    except Exception as err:
        if not _files(ckpt.path) < files:
            raise
        # Files went while they were read: a stage still running removed the checkpoint (its rotation).
        latest = artifacts.latest_checkpoint(ckpt.path.parent)
        newest = f"the newest, {latest}" if latest is not None else "a newer one"
        raise ArtifactError(f"{ckpt.path}: removed while it was being exported: the running stage keeps only its "
                            f"last checkpoints and rotated this one away; export {newest}, or copy a checkpoint "
                            "aside and export the copy") from err
    lora = _is_peft(model)
    if adapter_only and not lora:
        raise ConfigError(f"--adapter-only: {ckpt.weights} holds no LoRA adapter (full weights were trained); "
                          "export without --adapter-only")
    if lora and adapter_only:
        model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve()) if Path(base).is_dir() else base
    elif lora:
        model = model.merge_and_unload()
    meta = {"checkpoint": str(ckpt.path.resolve()), "stage": ckpt.stage, "role": ckpt.role, "step": ckpt.step,
            "weights": "lora adapter" if adapter_only else "merged lora" if lora else "full"}
    write_dir(model, tokenizer, out, meta)
    log.info("exported the %s %s of %s (step %d, %s) to %s", ckpt.stage, ckpt.role, ckpt.path, ckpt.step,
             meta["weights"], out)
    return out


def _files(path: Path) -> set[Path]:
    """The files under `path` (empty once it is gone, also while it is being removed)."""
    try:
        return {p.relative_to(path) for p in path.rglob("*") if not p.is_dir()}
    except OSError:
        return set()


def _is_peft(model) -> bool:
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def write_dir(model, tokenizer, out: Path, meta: dict) -> None:
    """save_pretrained (safetensors) + tokenizer + export.json into `<out>.tmp-<pid>`, then one rename; the
    files get the umask's mode."""
    from rlhf.models.files import umask_modes

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card
        artifacts.write_json_atomic(tmp / "export.json", meta)
        pickles = [p.name for p in tmp.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:  # never expected: save_pretrained writes safetensors; a guard, not a code path
            raise ModelError(f"{tmp}: the export would contain pickle files ({', '.join(pickles)})")
        umask_modes(tmp)  # safetensors writes the weights 0600
        if out.is_dir():
            out.rmdir()  # empty (check_out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
