"""What every stage shares: its directory, resume point (checked against the config that trained it),
Trainer arguments, callbacks and final save."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf import artifacts, claims, engine, trackers
from rlhf.config import PipelineConfig, TrainCfg, changed_settings, load_config, save_resolved, stage_settings
from rlhf.errors import ConfigError, StopRequested, TrainingError
from rlhf.replicate import agree_on_step, replicate
from rlhf.tracking import MetricsLogger

log = logging.getLogger("rlhf")

# What stops a run gracefully: SIGTERM (Slurm, Kubernetes and `docker stop` send it before a kill) and SIGUSR1
# (an early warning, e.g. `sbatch --signal=USR1@120`, that no launcher acts on). Both finish the current step,
# save a checkpoint there and exit 128 + the signal's number (rlhf.errors.StopRequested).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


@contextlib.contextmanager
def stop_signals(on_stop: Callable[[int], None]) -> Iterator[None]:
    """While training: each stop signal calls `on_stop(signum)`, which only records it (the loop stops after
    its step); the previous handlers come back afterwards. Handlers can only be set from the main thread;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: on_stop(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def agreed_stop_signal(received: int | None) -> int | None:
    """The stop signal any rank received, on every rank (one collective; the higher number when ranks got
    different ones). A signal reaches ranks at different moments, or only some of them: without this, one rank
    would save while another starts the next step, and their collectives would no longer match."""
    import torch

    flag = torch.tensor([float(received or 0)], device="cpu")  # a host value: it goes over gloo
    return int(engine.all_reduce(flag, "max").item()) or None


def stop_message(stage: str, signum: int, step: int, ckpt_dir: Path) -> str:
    return (f"{stage}: stopped on {signal.Signals(signum).name} at step {step} after saving a checkpoint in "
            f"{ckpt_dir}; resume with the same command")


@dataclass
class StageResult:
    stage: str
    final_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


class StageRun:
    """Directory layout and resume state of one stage run.

    <run>/<stage>/checkpoints/checkpoint-N  (complete only with its marker file)
    <run>/<stage>/final                     (renamed into place when fully written)
    <run>/<stage>/stage.json                (last)
    <run>/<stage>/claim.json                while the run lives (rlhf.claims)

    `device` is the run's device (`engine.device`), decided once here for everything the stage places.
    """

    def __init__(self, cfg: PipelineConfig, stage: str, *, restart: bool = False):
        self.cfg = cfg
        self.stage = stage
        self.device = engine.device(cfg.run.device)
        self.dir = cfg.stage_dir(stage)
        self.ckpt_dir = self.dir / "checkpoints"
        self.final_dir = self.dir / "final"
        # Before anything here is written or deleted (--restart too): one live run per stage dir.
        self.claim = claims.claim(self.dir, cfg.run.claim_timeout_s)
        if not restart:  # still nothing written: resume or keep only weights this config trains
            self._check_trained_config()
            self._check_checkpoint_engine()
        if engine.local_rank() == 0:  # the first rank of every node: its disk may be its own (rlhf.replicate)
            try:
                if restart:
                    for path in (self.ckpt_dir, self.final_dir, self.dir / artifacts.MANIFEST):
                        _remove(path)
                (self.dir / artifacts.MANIFEST).unlink(missing_ok=True)
                for path in artifacts.remove_incomplete_checkpoints(self.ckpt_dir):
                    log.warning("%s: removed an incomplete checkpoint (the run was stopped while saving it)", path)
            except OSError:
                if engine.is_main():  # elsewhere: another node's first rank raced on a shared filesystem
                    raise
        engine.barrier()
        # Every rank resumes from the newest checkpoint that all nodes hold complete.
        latest = artifacts.latest_checkpoint(self.ckpt_dir)
        self.resume_step = agree_on_step(artifacts.checkpoint_step(latest) if latest else None)
        self.resume = self.ckpt_dir / f"checkpoint-{self.resume_step}" if self.resume_step else None
        if self.resume is not None:
            log.info("%s: resuming from %s (step %d)", stage, self.resume, self.resume_step)
        self.metrics = MetricsLogger(self.dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.writes_tensorboard,
                                     enabled=engine.is_main(), resume_step=self.resume_step,
                                     trackers=self._trackers() if engine.is_main() else None)
        if engine.is_main():  # the settings of the checkpoints to come: `rlhf export` rebuilds their models
            resolved = self.dir / artifacts.RESOLVED_CONFIG
            try:
                save_resolved(cfg, resolved)
            except OSError as err:  # disk full, read-only: one line, like every other failed save
                raise save_failed(resolved, "the resolved config", err, self.resume) from err
        # Nodes with their own disks get it now, with the checkpoints it describes, not only at the end: their
        # `rlhf pipeline --pending` compares it with the config before the stage resumes.
        replicate(cfg.run.dir, [self.dir / artifacts.RESOLVED_CONFIG], by_content=True)

    def _check_trained_config(self) -> None:
        """`check_trained_config` on the main rank (its disk holds the record: it wrote it); every rank stops
        when it refuses."""
        refused, accepted = None, []
        if engine.is_main():
            try:
                accepted = check_trained_config(self.cfg, self.stage)
            except ConfigError as err:
                refused = err
        if engine.any_rank(refused is not None):
            raise refused or ConfigError(f"{self.dir}: the main rank refused to resume the {self.stage} stage under "
                                         "this config; its error names the keys")
        if accepted:
            log.info("%s: %s differ from the config its checkpoints were trained with, but the weights trained so "
                     "far are the same under both; resuming under the new values", self.stage, ", ".join(accepted))

    def _check_checkpoint_engine(self) -> None:
        """A Trainer checkpoint written without DeepSpeed holds no engine state for a DeepSpeed run to resume
        (transformers fails deep inside its loader): refuse in one line while the stage's record is intact.
        The other way round works (the Trainer reads the model and its own optimizer state). A PPO
        checkpoint is not a Trainer's: its engines keep their own state under actor/ (and critic/)."""
        latest = artifacts.latest_checkpoint(self.ckpt_dir)
        plain = (latest is not None and (latest / "trainer_state.json").is_file()
                 and not (latest / "latest").is_file() and not (latest / "actor").is_dir())
        if engine.any_rank(plain and engine.use_deepspeed(self.cfg.deepspeed)):
            raise ConfigError(f"{latest or self.ckpt_dir}: written by a run without DeepSpeed, which saved no DeepSpeed "
                              f"engine state to resume; run `rlhf {self.stage}` without DeepSpeed as it was trained, "
                              "or pass --restart to train the stage again under DeepSpeed")

    def _trackers(self) -> list:
        """The open trackers of `logging.report_to`, one run each for this stage (`rlhf.trackers`)."""
        if not set(self.cfg.logging.report_to) & set(trackers.TRACKERS):
            return []
        info = trackers.RunInfo(project=self.cfg.logging.project, run=self.cfg.run.name, stage=self.stage,
                                stage_dir=self.dir, config=self.cfg.to_dict(), resume=self.resume is not None)
        return trackers.open_trackers(self.cfg.logging.report_to, info)

    def trainer_args(self, train: TrainCfg) -> dict[str, Any]:
        """TrainingArguments keys common to the Trainer-based stages."""
        return {
            "output_dir": str(self.ckpt_dir),
            "learning_rate": train.learning_rate,
            "num_train_epochs": train.epochs,
            "max_steps": train.max_steps,
            "per_device_train_batch_size": train.batch_size,
            "per_device_eval_batch_size": train.eval_batch_size,
            "gradient_accumulation_steps": train.grad_accum,
            "warmup_steps": float(train.warmup_ratio),  # a float in [0, 1) is a share of all steps
            "lr_scheduler_type": train.lr_scheduler,
            "weight_decay": train.weight_decay,
            "max_grad_norm": train.max_grad_norm,
            "logging_steps": train.logging_steps,
            "logging_nan_inf_filter": False,  # the default hides NaN/inf losses from the logs and so from the guard
            "save_strategy": "steps",
            "save_steps": train.save_steps,
            "save_total_limit": train.save_total_limit,
            "eval_strategy": "steps" if train.eval_steps else "no",
            "eval_steps": train.eval_steps or None,
            "activation_checkpointing": train.gradient_checkpointing,  # TRL configs default it to True
            "report_to": "none",
            "disable_tqdm": not self.cfg.logging.progress,
            "dataloader_num_workers": 0,
            **engine.trainer_kwargs(self.cfg, train, self.device),
        }

    def callbacks(self) -> list:
        self._callback = _make_callback(self)
        return [self._callback]

    def train(self, trainer, role: str = "policy") -> None:
        """`trainer.train()` from the resume point. A stop signal (SIGTERM, SIGUSR1) saves a checkpoint after the
        current step and ends with `StopRequested`;
        a checkpoint save that fails on I/O (disk full, file-size limit, permissions) ends with a one-line
        `TrainingError` and leaves the previous complete checkpoint as the resume point; so does a CUDA
        out-of-memory error, naming `role` (the model trained: policy, reward) and the settings to try."""
        from rlhf.guards import catch_oom

        save = trainer._save_checkpoint  # the Trainer's checkpoint writer; the guard only adds error handling

        def guarded_save(*args, **kwargs):
            path = self.ckpt_dir / f"checkpoint-{trainer.state.global_step}"
            try:
                return save(*args, **kwargs)
            except Exception as err:
                failure = save_failed(path, "the checkpoint", err, artifacts.latest_checkpoint(self.ckpt_dir))
                if failure is None:
                    raise
                raise failure from err

        trainer._save_checkpoint = guarded_save
        self._callback.trainer = trainer
        try:
            with (stop_signals(self._callback.on_stop_signal),
                  catch_oom(self.stage, role, self.ckpt_dir, self.cfg.source)):
                trainer.train(resume_from_checkpoint=str(self.resume) if self.resume else None)
        except _TrainingDone:
            trainer.is_in_train = False  # what the Trainer's own end of training would reset
            log.info("%s: %s is at the last step; nothing left to train", self.stage, self.resume)
        self.check_stopped(trainer)

    def check_stopped(self, trainer) -> None:
        """After `trainer.train()`: a stop signal saved a checkpoint; end the command (exit 128 + signal). A signal
        that came after the last step's check stops every rank too (the Trainer saved that last step)."""
        if getattr(self, "_callback", None) is None:
            return
        self._callback.stop_signal = agreed_stop_signal(self._callback.stop_signal)
        if self._callback.stop_signal:
            self.metrics.close()
            raise StopRequested(stop_message(self.stage, self._callback.stop_signal, trainer.state.global_step,
                                             self.ckpt_dir), self._callback.stop_signal)

    def save_final(self, trainer, tokenizer, *, merge_base: str | None = None,
                   extra_files: dict[str, str] | None = None) -> Path:
        """Write `final/` atomically: every rank takes part (ZeRO-3 gathers weights to rank 0); then nodes
        whose disk does not show it get a copy (`rlhf.replicate`)."""
        tmp = self.dir / "final.tmp"
        if engine.is_main():
            _remove(tmp)
        engine.barrier()
        try:
            trainer.save_model(str(tmp))
            if engine.is_main():
                self._finish_final(tmp, tokenizer, merge_base, extra_files)
        except Exception as err:
            failure = save_failed(tmp, "the final model", err, artifacts.latest_checkpoint(self.ckpt_dir))
            if failure is None:
                raise
            raise failure from err
        engine.barrier()
        # Every rank reloads final/ for the held-out checks: nodes with their own disks need it now.
        replicate(self.cfg.run.dir, [self.final_dir], by_content=True)
        return self.final_dir

    def _finish_final(self, tmp: Path, tokenizer, merge_base: str | None, extra_files: dict[str, str] | None) -> None:
        from rlhf import models
        from rlhf.models.files import umask_modes

        if merge_base is not None and (tmp / "adapter_config.json").exists():
            models.merge_adapter_dir(tmp, merge_base)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; final/ holds safetensors and text only
        save_resolved(self.cfg, tmp / artifacts.RESOLVED_CONFIG)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        umask_modes(tmp)  # the weights were written 0600
        _remove(self.final_dir)
        tmp.replace(self.final_dir)

    def complete(self, metrics: dict[str, Any], inputs: dict[str, str], global_step: int,
                 devices: dict[str, str] | None = None) -> StageResult:
        """Write the manifest last: from here on the stage counts as done. `devices` (role -> device of
        that model's weights during training) goes into stage.json."""
        if engine.is_main():
            save_resolved(self.cfg, self.dir / artifacts.RESOLVED_CONFIG)
            artifacts.write_manifest(self.dir, self.stage, inputs=inputs, config_hash=self.cfg.hash(),
                                     metrics=metrics, global_step=global_step,
                                     devices=devices)
            log.info("%s: done -> %s", self.stage, self.final_dir)
        engine.barrier()
        # Nodes with their own disks get final/ (with what was added after the save) first, stage.json last.
        replicate(self.cfg.run.dir, [self.final_dir, self.dir / artifacts.RESOLVED_CONFIG], by_content=True)
        replicate(self.cfg.run.dir, [self.dir / artifacts.MANIFEST], by_content=True)
        self.metrics.close()
        if self.claim is not None:
            self.claim.release()
        return StageResult(self.stage, self.final_dir, metrics)


def check_trained_config(cfg: PipelineConfig, stage: str) -> list[str]:
    """Before a stage resumes from its checkpoints or is kept as complete: the config that trained them
    (`artifacts.recorded_config`) must agree with `cfg` in every key the stage's weights depend on
    (`rlhf.config.changed_settings`), else a one-line ConfigError naming those keys. Reads only. Returns the
    keys that differ but leave those weights alone (run-only keys, a raised PPO step count), which are
    accepted. A stage dir that holds nothing trained passes, and so
    does one without a record (a node-local copy of a stage still running; a complete one warns)."""
    stage_dir = cfg.stage_dir(stage)
    if not artifacts.holds_training(stage_dir):
        return []
    record = artifacts.recorded_config(stage_dir)
    if record is None:
        if (stage_dir / artifacts.MANIFEST).is_file():
            log.warning("%s: no %s records the settings its weights were trained with, so they are not compared "
                        "with this config", stage_dir, artifacts.RESOLVED_CONFIG)
        return []
    try:
        trained = load_config(record)
    except ConfigError as err:
        raise ConfigError(f"{record}: cannot be read back as the config that trained the {stage} stage "
                          f"({str(err).splitlines()[0]}); pass --restart to train it again") from None
    result, accepted = changed_settings(trained, cfg, stage, artifacts.trained_step(stage_dir))
    if result:
        old, new = stage_settings(trained, stage), stage_settings(cfg, stage)
        shown = ", ".join(f"{key} {_shown(old, key)} -> {_shown(new, key)}" for key in result[:4])
        more = f" and {len(result) - 4} more" if len(result) > 4 else ""
        raise ConfigError(f"{stage_dir}: trained under other values of keys its weights depend on: {shown}{more} "
                          f"(recorded in {record}); pass --restart (`{artifacts.STAGE_COMMAND[stage]} --restart`) "
                          "to train it again under the new values, or revert them to resume or keep it")
    return accepted


def _shown(values: dict[str, Any], key: str) -> str:
    text = repr(values[key]) if key in values else "unset"
    return text if len(text) <= 60 else f"{text[:57]}..."


# How an I/O failure reads once a library has wrapped it (safetensors: "I/O error: ... (os error 27)";
# torch.save: "file write failed").
_IO_FAILURE = re.compile(r"I/O error|os error \d+|\[Errno \d+\]|file write failed|No space left|File too large|"
                         r"Permission denied|Read-only file system|Disk quota", re.IGNORECASE)


def save_failed(path: Path, what: str, err: BaseException, resume_from: Path | None) -> TrainingError | None:
    """A failed save (disk full, file-size limit, read-only or unwritable dir) as a one-line TrainingError, or
    None when `err` is not an I/O failure. A half-written checkpoint dir is removed (it has no completion
    marker, so it would never be loaded; removing it frees the space it took)."""
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
    elif _IO_FAILURE.search(str(err)):
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    else:
        return None
    if engine.is_main() and artifacts.checkpoint_step(path) is not None and not (path / artifacts.COMPLETE_MARKER).exists():
        shutil.rmtree(path, ignore_errors=True)
    start = f"resume from {resume_from}" if resume_from is not None else "start over (no complete checkpoint yet)"
    return TrainingError(f"{path}: saving {what} failed ({reason}); free disk space or fix permissions, then re-run "
                         f"the same command to {start}")


class _TrainingDone(Exception):
    """Raised by the callback instead of a step past max_steps; `StageRun.train` treats it as the end."""


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _make_callback(run: StageRun):
    """A TrainerCallback: metrics to JSONL/TensorBoard, checkpoint completion markers, the non-finite guard
    (`rlhf.guards`: stop, or skip the optimizer step), stop signals."""
    from transformers import TrainerCallback

    from rlhf.guards import NonFiniteGuard

    class RunCallback(TrainerCallback):
        def __init__(self):
            self.stop_signal: int | None = None  # the first stop signal received (STOP_SIGNALS)
            self.last_logged = run.resume_step or 0
            self.guard = NonFiniteGuard(run.stage, run.cfg.run.on_nonfinite, run.cfg.run.max_consecutive_skips,
                                        run.ckpt_dir, f"Lower {run.stage}.learning_rate or check the model weights "
                                        "and data")
            self.trainer = None  # set by StageRun.train: the DeepSpeed engine's skip count lives there
            self.skipped_since_log = 0
            self._step_skipped = False
            self._ds_skipped = 0

        def on_stop_signal(self, signum: int) -> None:  # StageRun.train installs it for STOP_SIGNALS
            self.stop_signal = self.stop_signal or signum

        def _ds_engine(self):
            return getattr(self.trainer, "deepspeed", None) if self.trainer is not None else None

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            _before_optimizer_step(self, optimizer)

        def on_optimizer_step(self, args, state, control, **kwargs):
            _after_optimizer_step(self)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = _checked_logs(self, dict(logs or {}), state.global_step)
            if "loss" in logs or "grad_norm" in logs or self.skipped_since_log:
                self.last_logged = state.global_step
                self.skipped_since_log = 0
            run.metrics.log(state.global_step, logs)

        def on_step_begin(self, args, state, control, **kwargs):
            # Resumed from a checkpoint at the last step, the Trainer would run one step more than max_steps.
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise _TrainingDone
            # DeepSpeed steps inside backward, before on_pre_optimizer_step: count its skips from here
            self._ds_skipped = int(getattr(self._ds_engine(), "skipped_steps", 0))

        def on_step_end(self, args, state, control, **kwargs):
            return _after_step(self, state.global_step, control)

        def on_save(self, args, state, control, **kwargs):
            _complete_checkpoint(run, Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

    return RunCallback()


def _before_optimizer_step(cb, optimizer) -> None:
    """With `run.on_nonfinite: skip` and plain torch: discard non-finite gradients. (Under DeepSpeed the engine
    has already stepped, inside backward; `on_optimizer_step` reads whether it discarded the step.)"""
    from rlhf.guards import drop_nonfinite_grads

    cb._step_skipped = False
    if not cb.guard.skipping:
        return
    if cb._ds_engine() is None:  # gradients are already averaged over ranks here: every rank decides alike
        cb._step_skipped = drop_nonfinite_grads(p for g in optimizer.param_groups for p in g["params"])


def _after_optimizer_step(cb) -> None:
    eng = cb._ds_engine()
    if cb.guard.skipping and eng is not None:
        cb._step_skipped = int(getattr(eng, "skipped_steps", 0)) > cb._ds_skipped


def _after_step(cb, step: int, control):
    """Count a skipped step, turn a stop signal (on any rank) into save-and-stop, and force a log before every
    save."""
    if cb._step_skipped:
        cb._step_skipped = False
        cb.skipped_since_log += 1
        cb.guard.skipped("the gradient", float("nan"), step)
        control.should_log = True  # log the window now, so later windows stay checkable
    else:
        cb.guard.ok()
    cb.stop_signal = agreed_stop_signal(cb.stop_signal)
    if cb.stop_signal:
        control.should_save = True
        control.should_training_stop = True
    if control.should_save:
        control.should_log = True  # check the loss of every step since the last log before saving
    return control


def _checked_logs(cb, logs: dict, step: int) -> dict:
    """The non-finite guard on a Trainer log: a NaN/inf loss or grad_norm stops the run, unless the window
    holds a skipped step (`run.on_nonfinite: skip`); then the value is left out, not plotted as NaN."""
    from rlhf.guards import is_finite

    for key in ("loss", "grad_norm"):
        value = logs.get(key)
        if isinstance(value, float) and not is_finite(value):
            if not cb.skipped_since_log:  # a non-finite value reached the weights: never go on
                window = "" if step - cb.last_logged <= 1 else f" (logged over steps {cb.last_logged + 1}-{step})"
                raise cb.guard.stop_error(key, value, step, window)
            del logs[key]
    if cb.guard.skipping:
        logs["skipped_steps"] = float(cb.guard.total)
    return logs


def _complete_checkpoint(run: StageRun, path: Path, step: int) -> None:
    """After every rank wrote its part: the completion marker, then a copy on nodes with their own disks."""
    engine.barrier()
    if engine.is_main():
        _mark_complete(run, path, step)
    engine.barrier()
    replicate(run.cfg.run.dir, [path], prune=path.parent)


def _mark_complete(run: StageRun, path: Path, step: int) -> None:
    if not path.is_dir():
        return
    try:
        artifacts.mark_checkpoint_complete(path, step)
    except OSError as err:
        raise save_failed(path, "the checkpoint", err, artifacts.latest_checkpoint(run.ckpt_dir)) from err


def check_fitted(where: str, n_total: int, n_kept: int, max_length: int, unit: str = "rows") -> None:
    """After dropping over-long examples: an error when nothing is left, a warning with the count otherwise."""
    from rlhf.errors import DataError

    if n_total and not n_kept:
        raise DataError(f"{where}: all {n_total} {unit} are longer than data.max_length={max_length} tokens, "
                        "so nothing is left to train on; raise data.max_length or shorten the data")
    if n_kept < n_total:
        log.warning("%s: %d of %d %s are longer than data.max_length=%d tokens and were left out",
                    where, n_total - n_kept, n_total, unit, max_length)


def stage_tokenizer(cfg: PipelineConfig, model_dir: str):
    """The tokenizer a stage trains with: `model.tokenizer` when set, else the model's own."""
    from rlhf import models

    return models.load_tokenizer(models.resolve_model(cfg.model.tokenizer or model_dir),
                                 trust_remote_code=cfg.model.trust_remote_code,
                                 chat_template=cfg.model.chat_template)
