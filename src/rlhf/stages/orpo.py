"""Final stage, ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691): one stage from the base model,
no SFT stage and no reference model.

loss = NLL(chosen) + lambda * -log sigmoid(log odds(chosen) - log odds(rejected)), with odds(y) = p / (1 - p)
and log p the mean token log-prob of the response (the paper's eq. 4-7); lambda is `orpo.beta`. The loss is
`losses.orpo_loss`, driven by a small `transformers.Trainer` subclass, instead of TRL's experimental
ORPOTrainer, because the latter (trl 1.16) takes the NLL over prompt and response together (the paper's
NLL is over the response) and tokenizes the chat-rendered text a second time, appending EOS after the
template's trailing newline. Here pairs are encoded as every other stage encodes them (`rlhf.encoding`:
chat prompt with generation prompt, response, EOS), so ORPO trains exactly the sequences PPO samples and
the reward model scores.

Logged per step: orpo/nll, orpo/log_odds_ratio (mean log odds(chosen) - log odds(rejected)),
orpo/log_odds_chosen, orpo/accuracy (share of pairs whose log odds ratio is > 0). Before training and after
saving, the held-out log odds ratio is measured on the base model and on the reloaded final model, each
rank scoring its share of the pairs on the run's device (`rlhf.heldout`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator

from rlhf import encoding, engine, forwards, heldout, models
from rlhf.config import PipelineConfig
from rlhf.data import load_rows
from rlhf.guards import catch_oom
from rlhf.stages.common import StageResult, StageRun, check_fitted, stage_tokenizer

log = logging.getLogger("rlhf")
PLOT_KEYS = ["loss", "orpo/nll", "orpo/log_odds_ratio", "orpo/accuracy"]


def encode_pairs(tokenizer, rows: list[dict], max_length: int, where: str) -> Iterator[dict | None]:
    """Per pair, chosen/rejected ids with completion masks (1 on response tokens), or None when a side is
    over max_length; after the last pair, the count of those left out (`check_fitted`)."""
    n_kept = 0
    for enc in encoding.encode_rows(tokenizer, rows, ("chosen", "rejected"), max_length):
        if enc is None:
            yield None
            continue
        item = {}
        for side, (ids, n_prompt) in zip(("chosen", "rejected"), enc, strict=True):
            item[f"{side}_ids"], item[f"{side}_mask"] = ids, [0] * n_prompt + [1] * (len(ids) - n_prompt)
        n_kept += 1
        yield item
    check_fitted(where, len(rows), n_kept, max_length, "pairs")


def collate_pairs(pad_id: int):
    """Features -> right-padded [2B, T] input_ids, attention_mask, completion_mask (chosen rows first)."""
    from rlhf.batching import right_padded

    def collate(features: list[dict]) -> dict:
        seqs = [(f["chosen_ids"], f["chosen_mask"]) for f in features]
        seqs += [(f["rejected_ids"], f["rejected_mask"]) for f in features]
        input_ids, attention = right_padded([ids for ids, _ in seqs], pad_id)
        completion, _ = right_padded([mask for _, mask in seqs], 0)
        return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}

    return collate


def make_trainer(lam: float, **kwargs):
    """A transformers Trainer whose loss is `losses.orpo_loss` on paired batches from `collate_pairs`."""
    import torch
    from transformers import Trainer

    from rlhf import losses

    class ORPOTrainer(Trainer):
        loss_is_scaled_for_ga = False  # the loss is a per-micro-batch mean: let the Trainer divide by grad_accum

        def __init__(self, **kw):
            super().__init__(**kw)
            self._stats = {"train": defaultdict(list), "eval": defaultdict(list)}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            chosen, rejected = forwards.mean_response_logps(model, inputs).chunk(2)
            loss, stats = losses.orpo_loss(-chosen, chosen, rejected, lam)
            stats["orpo/accuracy"] = (chosen > rejected).float().mean()  # log odds are monotone in log p
            values = self.accelerator.gather(torch.stack(list(stats.values())).detach()[None])  # [ranks, k]
            mode = "train" if model.training else "eval"
            for key, value in zip(stats, values.mean(0).tolist(), strict=True):
                self._stats[mode][key].append(value)
            return (loss, {}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

        def log(self, logs: dict, start_time: float | None = None) -> None:
            mode = "train" if self.model.training else "eval"
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{k}": sum(v) / len(v) for k, v in self._stats[mode].items() if v})
            self._stats[mode].clear()
            super().log(logs, start_time)

    return ORPOTrainer(**kwargs)


def run(cfg: PipelineConfig, *, restart: bool = False) -> StageResult:
    from datasets import Dataset
    from transformers import TrainingArguments, set_seed

    stage = StageRun(cfg, "orpo", restart=restart)
    base = models.resolve_model(cfg.model.name_or_path)
    tokenizer = stage_tokenizer(cfg, base)
    train_rows, eval_rows, path = load_rows(cfg, "orpo", "preference")

    def encode(rows: list[dict]) -> Iterator[dict | None]:
        return encode_pairs(tokenizer, rows, cfg.data.max_length, path)

    train_ds = encoding.encoded_dataset(encode(train_rows), len(train_rows), desc="orpo: tokenizing pairs",
                                        progress=cfg.logging.progress and engine.is_main())
    # One held-out set, bounded by data.eval_max_rows: the Trainer's evaluation and the checks before and after.
    check_rows, held_items = heldout.select(eval_rows or train_rows, encode, cfg, "orpo")
    eval_ds = Dataset.from_list(held_items) if eval_rows else None
    size = cfg.orpo.eval_batch_size
    with catch_oom("orpo", "policy", stage.ckpt_dir, cfg.source, batch_key="orpo.eval_batch_size"):
        # new LoRA adapters start at zero, so before training the model is the base model
        before = log_odds_report(heldout.saved_pair_logps(base, cfg, tokenizer, check_rows, mean=True,
                                                          batch_size=size, device=stage.device,
                                                          desc="orpo: held-out check before"))
    # The arguments before the model: under ZeRO-3 the model then loads partitioned over the ranks (zero.Init).
    args = TrainingArguments(**stage.trainer_args(cfg.orpo), remove_unused_columns=False)
    lora = models.lora_dict(cfg.model.lora)
    set_seed(cfg.run.seed)  # the adapters' other half is initialised randomly: make it follow run.seed
    model = models.load_causal_lm(base, tokenizer=tokenizer, trust_remote_code=cfg.model.trust_remote_code,
                                  allow_pickle=cfg.model.allow_pickle, dtype=engine.trained_load_dtype(cfg, stage.device), lora=lora)
    trainer = make_trainer(cfg.orpo.beta, model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                           data_collator=collate_pairs(tokenizer.pad_token_id), processing_class=tokenizer,
                           callbacks=stage.callbacks())
    stage.train(trainer)  # resume, SIGTERM stop, one-line save and out-of-memory failures
    report = {"train_pairs": len(train_ds), "eval_pairs": len(check_rows) if eval_rows else 0,
              "global_step": trainer.state.global_step,
              "lambda": cfg.orpo.beta, **{f"heldout_{k}_before": v for k, v in before.items()}}
    if eval_ds is not None and len(eval_ds):
        with catch_oom("orpo", "policy", stage.ckpt_dir, cfg.source, batch_key="orpo.eval_batch_size"):
            report.update({k: v for k, v in trainer.evaluate().items() if k.startswith("eval_")})
    final = stage.save_final(trainer, tokenizer, merge_base=base if lora else None)
    with catch_oom("orpo", "policy", stage.ckpt_dir, cfg.source, batch_key="orpo.eval_batch_size"):
        after = log_odds_report(heldout.saved_pair_logps(final, cfg, tokenizer, check_rows, mean=True,
                                                         batch_size=size, device=stage.device,
                                                         desc="orpo: held-out check after"))
    report.update({f"heldout_{k}_after": v for k, v in after.items()})
    if engine.is_main():
        log.info("orpo: held-out log odds ratio %.3f -> %.3f, accuracy %.3f -> %.3f (%d pairs)",
                 before["log_odds_ratio"], after["log_odds_ratio"], before["accuracy"], after["accuracy"],
                 len(check_rows))
        stage.metrics.log(trainer.state.global_step, {f"eval/{k}": v for k, v in report.items()
                                                      if isinstance(v, float)})
        _plot(cfg, stage)
    return stage.complete(report, {"model": base, "data": str(path)}, trainer.state.global_step,
                          devices={"policy": engine.trainer_device(trainer)})


def log_odds_report(means: list[list[float]]) -> dict[str, float]:
    """Held-out ORPO statistics from per-row [chosen, rejected] mean response log-probs: mean log odds ratio,
    accuracy (ratio > 0), chosen NLL, loss at lambda 1."""
    import torch

    from rlhf import losses

    chosen, rejected = (torch.tensor(side, device="cpu") for side in zip(*means, strict=True))  # gathered floats
    loss, stats = losses.orpo_loss(-chosen, chosen, rejected, 1.0)
    return {"log_odds_ratio": float(stats["orpo/log_odds_ratio"]), "nll": float(stats["orpo/nll"]),
            "accuracy": float((chosen > rejected).float().mean()), "loss_lambda1": float(loss)}


def _plot(cfg: PipelineConfig, stage: StageRun) -> None:
    if cfg.logging.plots and cfg.logging.jsonl:
        from rlhf.plots import plot_curves

        plot_curves(stage.dir / "metrics.jsonl", stage.dir / "curves.png", PLOT_KEYS, "ORPO")
