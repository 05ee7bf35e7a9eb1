"""Final stage, DPO: TRL's DPOTrainer on the SFT output (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290).

The reference is the SFT model: TRL loads a frozen copy of it (`ref_model=None`), or, with LoRA, uses the
actor with its adapters disabled. `dpo.precompute_ref_log_probs` scores the reference once before training
instead; the pairs are then read from a dataset saved under `<run>/dpo/data/`, because TRL's main process
writes the reference log-probs to a cache file in the dataset's directory and every rank reads that file
(an in-memory dataset's cache file would get a random name in a per-process temporary directory).

Pairs go to TRL in the conversational explicit-prompt form (prompt messages, one assistant message per
side). TRL logs the implicit rewards beta * (log pi - log ref) of both sides, their accuracy and margin.
After saving, the reloaded model is scored against the SFT model on the held-out pairs with this
package's own encoding (`rlhf.encoding`) and `losses.dpo_loss`'s statistics: a check independent of TRL,
split over ranks (`rlhf.heldout`).

The held-out pairs (`rlhf.heldout.select`) are the same for TRL's evaluation and that check: at most
`data.eval_max_rows`, of those within `data.max_length` as this package encodes them. (Training pairs over
`data.max_length` are not left out here: TRL truncates them.)

The held-out `loss` is the configured `dpo.loss_type` (`losses.dpo_loss`, `ipo_loss` or `hinge_loss`).
Note: TRL's `ipo` divides each side's log-ratio by its token count before the loss (as the IPO authors'
code does), while `losses.ipo_loss` uses whole-sequence log-probs (the paper's formula), so the two `ipo`
losses differ in scale.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from rlhf import artifacts, encoding, engine, heldout, models
from rlhf.config import PipelineConfig
from rlhf.data import load_rows
from rlhf.guards import catch_oom
from rlhf.replicate import replicate
from rlhf.stages.common import StageResult, StageRun

log = logging.getLogger("rlhf")
PLOT_KEYS = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"]


def sft_output(cfg: PipelineConfig) -> str:
    return str(artifacts.stage_output(cfg.stage_dir("sft"), "sft", needed_by="the dpo stage", config_path=cfg.source))


def trl_rows(rows: list[dict]) -> list[dict]:
    """Internal-schema pairs -> TRL's conversational explicit-prompt form (extra columns dropped)."""
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


def fitting_pairs(tokenizer, rows: list[dict], max_length: int) -> Iterator[dict | None]:
    """Each pair, or None when a side is over max_length as `rlhf.encoding` encodes it."""
    encoded = encoding.encode_rows(tokenizer, rows, ("chosen", "rejected"), max_length)
    for row, enc in zip(rows, encoded, strict=True):
        yield None if enc is None else row


def build_dataset(rows: list[dict], where: Path | None):
    """An in-memory Dataset, or (with `where`) one saved there by the main rank and loaded by every rank."""
    from datasets import Dataset, load_from_disk

    if where is None:
        return Dataset.from_list(rows)
    if engine.local_rank() == 0:  # every node's copy goes, so no node keeps a stale one (rlhf.replicate)
        shutil.rmtree(where, ignore_errors=True)
    engine.barrier()
    if engine.is_main():
        Dataset.from_list(rows).save_to_disk(str(where))
    engine.barrier()
    replicate(where.parent, [where])
    return load_from_disk(str(where))


def run(cfg: PipelineConfig, *, restart: bool = False) -> StageResult:
    from trl import DPOConfig, DPOTrainer

    sft_dir = sft_output(cfg)  # before any work: a missing SFT output is a one-line error
    stage = StageRun(cfg, "dpo", restart=restart)
    tokenizer = models.load_tokenizer(sft_dir, trust_remote_code=cfg.model.trust_remote_code)
    train_rows, eval_rows, path = load_rows(cfg, "dpo", "preference")
    held_rows, _ = heldout.select(eval_rows or train_rows,
                                  lambda rows: fitting_pairs(tokenizer, rows, cfg.data.max_length), cfg, "dpo")
    on_disk = cfg.dpo.precompute_ref_log_probs
    train_ds = build_dataset(trl_rows(train_rows), stage.dir / "data" / "train" if on_disk else None)
    eval_ds = build_dataset(trl_rows(held_rows), stage.dir / "data" / "eval" if on_disk else None) if eval_rows else None
    kwargs = stage.trainer_args(cfg.dpo)
    # TRL configs default `gradient_checkpointing` to True; the new name wins over the deprecated one.
    kwargs["activation_checkpointing"] = cfg.dpo.gradient_checkpointing
    # The arguments before the model: under ZeRO-3 the model then loads partitioned over the ranks (zero.Init).
    args = DPOConfig(**kwargs, beta=cfg.dpo.beta, loss_type=[cfg.dpo.loss_type], max_length=cfg.data.max_length,
                     precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs, disable_dropout=True,
                     dataset_num_proc=None)
    model = models.load_causal_lm(sft_dir, tokenizer=tokenizer, trust_remote_code=cfg.model.trust_remote_code,
                                  allow_pickle=cfg.model.allow_pickle, dtype=engine.trained_load_dtype(cfg, stage.device))
    peft_config = models.lora_config(cfg.model.lora, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=stage.callbacks(), peft_config=peft_config)
    stage.train(trainer)  # resume, SIGTERM stop, one-line save and out-of-memory failures
    report = {"train_pairs": len(train_ds), "eval_pairs": len(held_rows) if eval_rows else 0,
              "global_step": trainer.state.global_step,
              "beta": cfg.dpo.beta, "loss_type": cfg.dpo.loss_type}
    if eval_ds is not None:
        with catch_oom("dpo", "policy", stage.ckpt_dir, cfg.source, batch_key="dpo.eval_batch_size"):
            ev = trainer.evaluate()
        report.update({f"trl_{k}": v for k, v in ev.items() if k.startswith("eval_rewards/")})
    final = stage.save_final(trainer, tokenizer, merge_base=sft_dir if peft_config is not None else None)
    report.update(heldout_report(final, sft_dir, held_rows, cfg, stage.ckpt_dir, stage.device))
    if engine.is_main():
        stage.metrics.log(trainer.state.global_step, {f"eval/{k}": v for k, v in report.items()
                                                      if isinstance(v, float)})
        _plot(cfg, stage)
    return stage.complete(report, {"model": sft_dir, "data": str(path)}, trainer.state.global_step,
                          devices={"policy": engine.trainer_device(trainer)})


LOSSES = {"sigmoid": "dpo_loss", "ipo": "ipo_loss", "hinge": "hinge_loss"}  # dpo.loss_type -> rlhf.losses


def rewards_report(policy_logps: list[list[float]], ref_logps: list[list[float]], beta: float,
                   loss_type: str = "sigmoid") -> dict[str, float]:
    """The implicit-reward statistics and the `loss_type` loss (`LOSSES`) from per-row [chosen, rejected]
    response log-probs of the policy and the reference.

    rewards/accuracy counts pairs whose chosen implicit reward is strictly higher, so a policy equal to its
    reference (every reward 0) scores 0.
    """
    import torch

    from rlhf import losses

    # gathered Python floats: the report is a few hundred numbers, computed on the host
    (policy_chosen, policy_rejected), (ref_chosen, ref_rejected) = (
        [torch.tensor(side, device="cpu") for side in zip(*logps, strict=True)]
        for logps in (policy_logps, ref_logps))
    loss_fn = getattr(losses, LOSSES[loss_type])
    loss, stats = loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return {"loss": float(loss), **{k: float(v) for k, v in stats.items()}}


def heldout_report(final_dir: Path, ref_dir: str, rows: list[dict], cfg: PipelineConfig,
                   ckpt_dir: Path, device) -> dict[str, float]:
    """Reload the saved model and the SFT reference as a user would, one after the other; implicit-reward
    stats on `rows`. Collective: every rank scores its share on `device`, the stage's (`rlhf.heldout`)."""
    tokenizer = models.load_tokenizer(str(final_dir))
    logps = {}
    for role, path in (("policy", final_dir), ("ref", ref_dir)):  # one model in memory at a time
        with catch_oom("dpo", role, ckpt_dir, cfg.source, batch_key="dpo.eval_batch_size"):
            logps[role] = heldout.saved_pair_logps(path, cfg, tokenizer, rows, mean=False, device=device,
                                                   batch_size=cfg.dpo.eval_batch_size,
                                                   desc=f"dpo: held-out check ({role})")
    stats = rewards_report(logps["policy"], logps["ref"], cfg.dpo.beta, cfg.dpo.loss_type)
    if engine.is_main():
        log.info("dpo: held-out implicit-reward accuracy %.3f, margin %.3f (%d pairs)",
                 stats["rewards/accuracy"], stats["rewards/margin"], len(rows))
    return {f"heldout_{k}": v for k, v in stats.items()}


def _plot(cfg: PipelineConfig, stage: StageRun) -> None:
    if cfg.logging.plots and cfg.logging.jsonl:
        from rlhf.plots import plot_curves

        plot_curves(stage.dir / "metrics.jsonl", stage.dir / "curves.png", PLOT_KEYS, "DPO")
