"""Stage 1: supervised fine-tuning with TRL's SFTTrainer on the project's data and model layers.

Rows are tokenized here with `rlhf.encoding` (prompt rendered for generation, response, EOS), so the
policy learns exactly the sequences it will later generate in PPO; the loss covers the response by
default. Evaluation reports loss and perplexity on the held-out split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

from rlhf import encoding, engine, heldout, models
from rlhf.config import PipelineConfig
from rlhf.data import load_rows
from rlhf.stages.common import StageResult, StageRun, check_fitted, stage_tokenizer

log = logging.getLogger("rlhf")

def encode_sft(tokenizer, rows: list[dict], max_length: int, where: str) -> Iterator[dict | None]:
    """Per row, input_ids + completion_mask, or None when it is longer than max_length; after the last row,
    the count of those left out (`check_fitted`).

    The mask is 1 on the reply and on every earlier assistant turn of a multi-turn conversation, so with
    `sft.completion_only_loss` (TRL turns the mask into -100 labels) each assistant turn is trained and
    nothing else is.
    """
    n_kept = n_unplaced = 0
    for row, enc in zip(rows, encoding.encode_rows(tokenizer, rows, ("completion",), max_length), strict=True):
        if enc is None:
            yield None
            continue
        ids, n_prompt = enc[0]
        mask = [0] * n_prompt + [1] * (len(ids) - n_prompt)
        if any(m["role"] == "assistant" for m in row["prompt"]):
            spans = encoding.assistant_spans(tokenizer, row["prompt"], ids[:n_prompt])
            n_unplaced += spans is None
            for start, end in spans or ():
                mask[start:end] = [1] * (end - start)
        n_kept += 1
        yield {"input_ids": ids, "completion_mask": mask}
    check_fitted(where, len(rows), n_kept, max_length, "rows")
    if n_unplaced:
        log.warning("%s: %d multi-turn rows train only their last reply: the chat template renders the start "
                    "of a conversation differently on its own, so earlier assistant turns cannot be placed",
                    where, n_unplaced)


def run(cfg: PipelineConfig, *, restart: bool = False) -> StageResult:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    stage = StageRun(cfg, "sft", restart=restart)
    base = models.resolve_model(cfg.model.name_or_path)
    tokenizer = stage_tokenizer(cfg, base)
    train_rows, eval_rows, path = load_rows(cfg, "sft", "sft")

    def encode(rows: list[dict]) -> Iterator[dict | None]:
        return encode_sft(tokenizer, rows, cfg.data.max_length, path)

    train_ds = encoding.encoded_dataset(encode(train_rows), len(train_rows), desc="sft: tokenizing rows",
                                        progress=cfg.logging.progress and engine.is_main())
    eval_ds = None
    if eval_rows:  # bounded by data.eval_max_rows, the rows over data.max_length left out as in training
        eval_ds = Dataset.from_list(heldout.select(eval_rows, encode, cfg, "sft", "rows")[1])
    # The arguments first: under ZeRO-3 they register DeepSpeed's config, and transformers then loads the model
    # already partitioned over the ranks (zero.Init) instead of whole on every rank.
    args = SFTConfig(**stage.trainer_args(cfg.sft), max_length=cfg.data.max_length, packing=cfg.sft.packing,
                     completion_only_loss=cfg.sft.completion_only_loss, dataset_num_proc=None)
    model = models.load_causal_lm(base, tokenizer=tokenizer, trust_remote_code=cfg.model.trust_remote_code,
                                  allow_pickle=cfg.model.allow_pickle,
                                  dtype=engine.trained_load_dtype(cfg, stage.device))
    peft_config = models.lora_config(cfg.model.lora, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=stage.callbacks(), peft_config=peft_config)
    stage.train(trainer)  # resume, SIGTERM stop, one-line save failures
    metrics = {"train_rows": len(train_ds), "eval_rows": len(eval_ds) if eval_ds is not None else 0,
               "global_step": trainer.state.global_step}
    if eval_ds is not None and len(eval_ds):
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50.0))
        stage.metrics.log(trainer.state.global_step, {"eval/loss": metrics["eval_loss"],
                                                      "eval/perplexity": metrics["eval_perplexity"]})
    stage.save_final(trainer, tokenizer, merge_base=base if peft_config is not None else None)
    _plot(cfg, stage.dir)
    return stage.complete(metrics, {"model": base, "data": str(path)}, trainer.state.global_step,
                          devices={"policy": engine.trainer_device(trainer)})


def _plot(cfg: PipelineConfig, stage_dir: Path) -> None:
    if cfg.logging.plots and cfg.logging.jsonl:
        from rlhf.plots import plot_curves

        if engine.is_main():
            plot_curves(stage_dir / "metrics.jsonl", stage_dir / "curves.png",
                        ["loss", "mean_token_accuracy", "grad_norm", "learning_rate"], "SFT")
