"""Held-out checks of the Trainer stages (reward, DPO, ORPO), split over ranks.

Every rank loads the saved model whole, on the run's device in the run's dtype, scores its own share of
the held-out rows, and the per-row results are gathered back in row order: every rank then computes the
same report, and no rank waits at a barrier while one scores all rows. A rank's share is a contiguous run
of whole batches, so each row sits in the same batch (with the same padding) as in a single process and
the results equal a one-process run's.

Which rows: `select` takes the same length rule as training (rows longer than `data.max_length` are left
out) and at most `data.eval_max_rows` of the rest, a sample seeded by `run.seed`; a stage gives the same rows
to its Trainer's eval set and to these checks, which so score at most that many rows whatever the size of
the held-out split.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlhf import engine
from rlhf.config import PipelineConfig
from rlhf.errors import DataError

log = logging.getLogger("rlhf")


def shard(n_rows: int, rank: int, world: int, batch_size: int) -> range:
    """The rows of `rank`: whole batches of `batch_size`, as even a split as whole batches allow (a rank may
    get none when there are fewer batches than ranks)."""
    n_batches = -(-n_rows // batch_size)
    first, last = n_batches * rank // world, n_batches * (rank + 1) // world
    return range(min(first * batch_size, n_rows), min(last * batch_size, n_rows))


def merge(parts: list[list[Any]]) -> list[Any]:
    """Per-rank results, in rank order and each in row order -> one list in row order."""
    return [item for part in parts for item in part]


def select(rows: list[dict], encode: Callable[[list[dict]], Iterator[Any]], cfg: PipelineConfig, stage: str,
           unit: str = "pairs") -> tuple[list[dict], list[Any]]:
    """The held-out set of `stage`: (rows, their items from `encode`), in file order.

    `encode` (a stage's encoder: rows -> an iterator of one item per row, None for a row that training
    leaves out as longer than `data.max_length`) is walked over the rows in an order shuffled with
    `run.seed`, and stops once `data.eval_max_rows` items are kept (all of them when null): a seeded sample
    of the rows within `data.max_length`, that costs only the rows read on the way. Every rank gets the same
    set. `unit` names the rows in the log line and in the error when none fits, which name the stage's
    held-out file (its training file when the held-out rows come from there).
    """
    from rlhf.data import data_source, label
    from rlhf.data.stage_rows import EVAL_KEY

    source, _, kind = data_source(cfg, stage)
    where = label(getattr(cfg.data, EVAL_KEY[kind]) or source)
    limit = cfg.data.eval_max_rows or len(rows)
    order = list(range(len(rows)))
    random.Random(cfg.run.seed).shuffle(order)
    kept: dict[int, Any] = {}
    n_read = n_long = 0
    # zip asks `order` first, so `encode` is never resumed past the last row: its end-of-rows count (written
    # for training) is not logged for these rows; the line below says what was left out here.
    for i, item in zip(order, encode([rows[i] for i in order]), strict=False):
        n_read += 1
        n_long += item is None
        if item is not None:
            kept[i] = item
            if len(kept) == limit:
                break
    if rows and not kept:
        raise DataError(f"{where}: all {len(rows)} held-out {unit} are longer than data.max_length="
                        f"{cfg.data.max_length} tokens, so nothing is left to check; raise data.max_length or "
                        "shorten the data")
    if engine.is_main() and rows:
        log.info("%s: held-out check on %d of %d held-out %s (data.eval_max_rows=%s, sampled with run.seed); %d "
                 "of the %d read on the way were longer than data.max_length=%d and left out", where, len(kept),
                 len(rows), unit, cfg.data.eval_max_rows, n_long, n_read, cfg.data.max_length)
    ordered = sorted(kept)
    return [rows[i] for i in ordered], [kept[i] for i in ordered]


def map_rows(rows: list, fn: Callable[[list], list], batch_size: int, *, desc: str = "held-out check",
             progress: bool = False) -> list:
    """`fn` (rows -> one picklable result per row) on this rank's shard of `rows`; returns every row's
    result, in row order, on every rank. Collective: every rank calls it with the same rows.

    `fn` gets one batch at a time, so each row sits in the batch it would sit in with one call, and the
    main rank shows a progress bar over its shard (`progress`)."""
    from tqdm.auto import tqdm

    own = shard(len(rows), engine.rank(), engine.world_size(), batch_size)
    mine = []
    with tqdm(total=len(own), desc=desc, unit="row", disable=not (progress and engine.is_main())) as bar:
        for start in range(own.start, own.stop, batch_size):
            batch = rows[start:min(start + batch_size, own.stop)]
            mine.extend(fn(batch))
            bar.update(len(batch))
    results = merge(engine.all_gather_object(mine))
    if len(results) != len(rows):  # a rank count that disagrees with the process group's
        raise RuntimeError(f"held-out check: gathered {len(results)} results for {len(rows)} rows")
    return results


def load_saved(path: str | Path, loader: Callable, cfg: PipelineConfig, tokenizer, *, device, **kwargs):
    """A saved model as a user loads it (`loader`: models.load_causal_lm or load_scalar_model), whole on
    every rank (ZeRO-3's load-time partitioning is off meanwhile), on `device` (the stage's) in
    `model.dtype`, in eval mode."""
    with engine.single_process_loading():
        model = loader(str(path), tokenizer=tokenizer, trust_remote_code=cfg.model.trust_remote_code,
                       dtype=engine.run_dtype(cfg, device), **kwargs)
    return model.to(device).eval()


def saved_pair_logps(path: str | Path, cfg: PipelineConfig, tokenizer, rows: list[dict], *, mean: bool,
                     batch_size: int, device, desc: str = "held-out log-probs") -> list[list[float]]:
    """Per preference row, [chosen, rejected] response log-probs (`forwards.pair_logps`) of the causal LM
    saved at `path`, on `device`, under a progress bar named `desc`. Collective."""
    from rlhf import models
    from rlhf.forwards import pair_logps

    model = load_saved(path, models.load_causal_lm, cfg, tokenizer, device=device)
    return map_rows(rows, lambda part: pair_logps(model, tokenizer, part, mean=mean, batch_size=batch_size),
                    batch_size, desc=desc, progress=cfg.logging.progress)
