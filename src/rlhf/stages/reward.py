"""Stage 2: a reward model (1-label sequence-classification head) trained with TRL's RewardTrainer.

Works after SFT (the default base is the SFT output when the file has an `sft` section) and on its own
from any base model ("reward-model-only training"). Pairs are tokenized with `rlhf.encoding`, so the
score is read at the EOS token exactly as PPO will read it. After training, every rank reloads the saved
model as a user would and scores its share of the held-out pairs (`rlhf.heldout`): preference accuracy,
margin, and the reward mean/std that PPO uses to normalise scores (stored as `reward_stats.json` next to
the weights).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from rlhf import artifacts, encoding, engine, heldout, metrics, models, scoring
from rlhf.config import PipelineConfig
from rlhf.data import load_rows
from rlhf.guards import catch_oom
from rlhf.stages.common import StageResult, StageRun, check_fitted, stage_tokenizer

log = logging.getLogger("rlhf")


def base_model(cfg: PipelineConfig) -> str:
    """The model the score head goes on: reward.base_model, else the SFT output if the file has SFT, else the base."""
    if cfg.reward.base_model:
        return models.resolve_model(cfg.reward.base_model)
    if "sft" in cfg.present:
        return str(artifacts.stage_output(cfg.stage_dir("sft"), "sft", needed_by="the reward stage",
                                          config_path=cfg.source))
    return models.resolve_model(cfg.model.name_or_path)


def encode_pairs(tokenizer, rows: list[dict], max_length: int, where: str,
                 use_margin: bool) -> Iterator[dict | None]:
    """Per pair, chosen_ids / rejected_ids (and margin), or None when a side is over max_length; after the
    last pair, the count of those left out (`check_fitted`)."""
    n_kept = 0
    for row, enc in zip(rows, encoding.encode_rows(tokenizer, rows, ("chosen", "rejected"), max_length),
                        strict=True):
        if enc is None:
            yield None
            continue
        item = {"chosen_ids": enc[0][0], "rejected_ids": enc[1][0]}
        if use_margin:
            item["margin"] = float(row.get("margin") or 0.0)
        n_kept += 1
        yield item
    check_fitted(where, len(rows), n_kept, max_length, "pairs")


def run(cfg: PipelineConfig, *, restart: bool = False) -> StageResult:
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    stage = StageRun(cfg, "reward", restart=restart)
    base = base_model(cfg)
    tokenizer = stage_tokenizer(cfg, base)
    train_rows, eval_rows, path = load_rows(cfg, "reward", "preference")

    def encode(rows: list[dict]) -> Iterator[dict | None]:
        return encode_pairs(tokenizer, rows, cfg.data.max_length, path, cfg.reward.margin)

    train_ds = encoding.encoded_dataset(encode(train_rows), len(train_rows), desc="reward: tokenizing pairs",
                                        progress=cfg.logging.progress and engine.is_main())
    # One held-out set, bounded by data.eval_max_rows: the Trainer's evaluations and the checks after training.
    held_rows, held_items = heldout.select(eval_rows or train_rows, encode, cfg, "reward")
    eval_ds = Dataset.from_list(held_items) if eval_rows else None
    # The arguments before the model: under ZeRO-3 the model then loads partitioned over the ranks (zero.Init).
    args = RewardConfig(**stage.trainer_args(cfg.reward), max_length=cfg.data.max_length,
                        center_rewards_coefficient=cfg.reward.center_rewards_coefficient or None,
                        disable_dropout=True, dataset_num_proc=None)
    set_seed(cfg.run.seed)  # a new score head is initialised randomly: make it follow run.seed
    model = models.load_scalar_model(base, tokenizer=tokenizer, require_head=False,
                                     trust_remote_code=cfg.model.trust_remote_code,
                                     allow_pickle=cfg.model.allow_pickle,
                                     dtype=engine.trained_load_dtype(cfg, stage.device))
    peft_config = models.lora_config(cfg.model.lora, task_type="SEQ_CLS")
    trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, callbacks=stage.callbacks(), peft_config=peft_config)
    stage.train(trainer, role="reward")  # resume, SIGTERM stop, one-line save and out-of-memory failures
    check_rows = held_rows[:16]
    live = _live_scores(trainer, tokenizer, check_rows, cfg.reward.eval_batch_size)  # all ranks: may be sharded
    final = stage.save_final(trainer, tokenizer, merge_base=base if peft_config is not None else None)
    report = {"train_pairs": len(train_ds), "eval_pairs": len(held_rows) if eval_rows else 0,
              "global_step": trainer.state.global_step}
    with catch_oom("reward", "reward", stage.ckpt_dir, cfg.source, batch_key="reward.eval_batch_size"):
        report.update(evaluate_reward_model(final, held_rows, cfg, device=stage.device, live=(check_rows, live)))
    if engine.is_main():
        stage.metrics.log(trainer.state.global_step, {f"eval/{k}": v for k, v in report.items()})
        _plot(cfg, stage)
    return stage.complete(report, {"model": base, "data": str(path)}, trainer.state.global_step,
                          devices={"reward": engine.trainer_device(trainer)})


def _live_scores(trainer, tokenizer, rows: list[dict], batch_size: int) -> list[float]:
    """Scores from the in-memory (possibly ZeRO-3 sharded) model; every rank must call this."""
    model = trainer.model
    was_training = model.training
    model.eval()
    chosen, rejected = scoring.score_preferences(model, tokenizer, rows, batch_size=batch_size)
    model.train(was_training)
    return chosen + rejected


def pair_scores(model, tokenizer, rows: list[dict], batch_size: int) -> list[tuple[float, float]]:
    """(chosen, rejected) reward per preference row."""
    return list(zip(*scoring.score_preferences(model, tokenizer, rows, batch_size=batch_size), strict=True))


def evaluate_reward_model(final_dir: Path, rows: list[dict], cfg: PipelineConfig, *, device,
                          live: tuple[list[dict], list[float]] | None = None) -> dict[str, float]:
    """Reload the saved model as any user would, score the pairs, and store reward stats with it (main rank).

    Collective: every rank scores its share of the rows on `device` (the stage's; `rlhf.heldout`) and gets the
    same report. With `live` (rows and the scores the trained model gave them before saving), also reports
    the largest difference between live and reloaded scores: a check that saving (e.g. gathering ZeRO-3
    shards) lost nothing.
    """
    tokenizer = models.load_tokenizer(str(final_dir))
    model = heldout.load_saved(final_dir, models.load_scalar_model, cfg, tokenizer, device=device, require_head=True)
    size = cfg.reward.eval_batch_size
    pairs = heldout.map_rows(rows, lambda part: pair_scores(model, tokenizer, part, size), size,
                             desc="reward: held-out check", progress=cfg.logging.progress)
    report = metrics.preference_report([c for c, _ in pairs], [r for _, r in pairs])
    report["loss"] = heldout_loss(pairs, rows, cfg.reward.margin)
    if live is not None:
        check_rows, live_scores = live
        again = heldout.map_rows(check_rows, lambda part: pair_scores(model, tokenizer, part, size), size)
        again_flat = [c for c, _ in again] + [r for _, r in again]  # the order of `live`: chosen, then rejected
        diff = max(abs(a - b) for a, b in zip(again_flat, live_scores, strict=True))
        report["saved_vs_live_max_abs_diff"] = diff
        if diff > 1e-3 and engine.is_main():
            log.warning("reward: the saved model scores differ from the trained one by up to %.4g", diff)
    stats = {"mean": report["reward_mean"], "std": report["reward_std"], "n": report["n"]}
    if engine.is_main():
        artifacts.write_json_atomic(final_dir / "reward_stats.json", stats)
        log.info("reward: held-out accuracy %.3f, margin %.3f, reward mean %.3f std %.3f (%d pairs)",
                 report["preference_accuracy"], report["reward_margin_mean"], stats["mean"], stats["std"], len(rows))
    return {k: float(v) for k, v in report.items()}


def heldout_loss(pairs: list[tuple[float, float]], rows: list[dict], use_margin: bool) -> float:
    """The training objective on held-out pairs: Bradley-Terry (`losses.pairwise_reward_loss`), with each
    pair's margin when `reward.margin` is on."""
    import torch

    from rlhf import losses

    chosen = torch.tensor([c for c, _ in pairs], dtype=torch.float64, device="cpu")
    rejected = torch.tensor([r for _, r in pairs], dtype=torch.float64, device="cpu")
    margin = None
    if use_margin:
        margin = torch.tensor([float(row.get("margin") or 0.0) for row in rows], dtype=torch.float64, device="cpu")
    return float(losses.pairwise_reward_loss(chosen, rejected, margin)[0])


def _plot(cfg: PipelineConfig, stage: StageRun) -> None:
    if cfg.logging.plots and cfg.logging.jsonl:
        from rlhf.plots import plot_curves

        plot_curves(stage.dir / "metrics.jsonl", stage.dir / "curves.png",
                    ["loss", "accuracy", "margin", "mean_reward"], "Reward model")

