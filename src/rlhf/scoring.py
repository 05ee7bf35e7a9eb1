"""Score (prompt, response) pairs with a reward model, the same way the reward stage trained it.

Sequences are built by `rlhf.encoding` (prompt rendered for generation + response + EOS) and right-padded
with a pad token distinct from EOS, so the sequence-classification head reads the score at the EOS token.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from rlhf import encoding

log = logging.getLogger("rlhf")


def encoded_batches(tokenizer, prompts: list, responses: list[str], batch_size: int, device,
                    max_length: int | None = None):
    """(input_ids, attention_mask) batches of (prompt, response) sequences as the reward stage trained on
    them, right-padded, so each row's score is read at its last attended token. Over-long sequences keep
    their end (the EOS the score is read at)."""
    sequences = (encoding.encode(tokenizer, p, r)[0] for p, r in zip(prompts, responses, strict=True))
    yield from padded_batches(tokenizer, sequences, batch_size, device, max_length)


def padded_batches(tokenizer, sequences, batch_size: int, device, max_length: int | None = None):
    """(input_ids, attention_mask) batches of whole token-id sequences, right-padded; over-long ones keep
    their end (the EOS the score is read at)."""
    from rlhf.batching import right_padded

    batch = []
    for ids in sequences:
        batch.append(ids[-max_length:] if max_length is not None and len(ids) > max_length else ids)
        if len(batch) == batch_size:
            yield right_padded(batch, tokenizer.pad_token_id, device)
            batch = []
    if batch:
        yield right_padded(batch, tokenizer.pad_token_id, device)


def score(model, tokenizer, prompts: list[list[dict]], responses: list[str], *, batch_size: int = 8,
          max_length: int | None = None) -> list[float]:
    """One scalar reward per (prompt, response). Over-long prompts keep their end so every row gets a score."""
    device = next(model.parameters()).device
    return _scores(model, encoded_batches(tokenizer, prompts, responses, batch_size, device, max_length))


def score_sequences(model, tokenizer, sequences: list[list[int]], *, batch_size: int = 8,
                    max_length: int | None = None) -> list[float]:
    """One scalar reward per token-id sequence already rendered as the reward stage trained on them
    (prompt for generation + response + EOS; `rlhf serve` scores OpenRLHF's whole-text queries this way)."""
    device = next(model.parameters()).device
    return _scores(model, padded_batches(tokenizer, sequences, batch_size, device, max_length))


def _scores(model, batches) -> list[float]:
    import torch

    scores: list[float] = []
    for input_ids, attention in batches:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits
        scores.extend(logits[:, 0].float().tolist())
    return scores


def score_preferences(model, tokenizer, rows: list[dict], *, batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Rewards of the chosen and the rejected side of internal-schema preference rows."""
    prompts = [r["prompt"] for r in rows]
    chosen = score(model, tokenizer, prompts, [encoding.content(r["chosen"]) for r in rows], batch_size=batch_size)
    rejected = score(model, tokenizer, prompts, [encoding.content(r["rejected"]) for r in rows], batch_size=batch_size)
    return chosen, rejected


def score_file(model_dir: str, data_path: str, *, out: str | None = None, batch_size: int = 8,
               max_length: int = 1024, device: str = "auto") -> int:
    """`rlhf score`: a JSONL line per row with its reward(s). Returns the number of rows scored.

    `model_dir`: a reward model dir, alias or hub id, or the reward stage's dir (its final/). `device`:
    auto, cpu or cuda (`engine.usable_device`: cuda without a CUDA GPU is refused before anything loads)."""
    from rlhf import artifacts, data, engine, models

    run_device = engine.usable_device(device, "--device")
    final = artifacts.final_of_stage_dir(model_dir, needed_by="rlhf score")
    path = str(final) if final is not None else models.resolve_model(model_dir)
    tokenizer = models.load_tokenizer(path)
    model = models.load_scalar_model(path, tokenizer=tokenizer, require_head=True).to(run_device).eval()
    kind = "preference" if _is_pairs(data_path) else "sft"
    rows = data.load(data_path, kind).rows
    sink = open(out, "w", encoding="utf-8") if out else sys.stdout
    try:
        if kind == "preference":
            chosen, rejected = score_preferences(model, tokenizer, rows, batch_size=batch_size)
            for row, c, r in zip(rows, chosen, rejected, strict=True):
                sink.write(json.dumps({"prompt": row["prompt"], "chosen": encoding.content(row["chosen"]),
                                       "rejected": encoding.content(row["rejected"]),
                                       "chosen_reward": c, "rejected_reward": r}) + "\n")
        else:
            rewards = score(model, tokenizer, [r["prompt"] for r in rows],
                            [encoding.content(r["completion"]) for r in rows], batch_size=batch_size,
                            max_length=max_length)
            for row, value in zip(rows, rewards, strict=True):
                sink.write(json.dumps({"prompt": row["prompt"], "response": encoding.content(row["completion"]),
                                       "reward": value}) + "\n")
    finally:
        if out:
            sink.close()
    if out:
        log.info("scored %d rows -> %s", len(rows), Path(out))
    return len(rows)


def _is_pairs(data_path: str) -> bool:
    """True when the file holds preference pairs (both sides get scored)."""
    from rlhf import data
    from rlhf.errors import DataError

    try:
        data.check_source(data_path, "preference")
        return True
    except DataError:
        return False
