"""Held-out checks of the Trainer stages (reward, DPO, ORPO), split over ranks.

Every rank loads the saved model whole, on the run's device in the run's dtype, scores its own share of
the held-out rows, and the per-row results are gathered back in row order: every rank then computes the
same report, and no rank waits at a barrier while one scores all rows. A rank's share is a contiguous run
of whole batches, so each row sits in the same batch (with the same padding) as in a single process and
the results equal a one-process run's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf import engine
from rlhf.config import PipelineConfig


def shard(n_rows: int, rank: int, world: int, batch_size: int) -> range:
    """The rows of `rank`: whole batches of `batch_size`, as even a split as whole batches allow (a rank may
    get none when there are fewer batches than ranks)."""
    n_batches = -(-n_rows // batch_size)
    first, last = n_batches * rank // world, n_batches * (rank + 1) // world
    return range(min(first * batch_size, n_rows), min(last * batch_size, n_rows))


def merge(parts: list[list[Any]]) -> list[Any]:
    """Per-rank results, in rank order and each in row order -> one list in row order."""
    return [item for part in parts for item in part]


def map_rows(rows: list, fn: Callable[[list], list], batch_size: int) -> list:
    """`fn` (rows -> one picklable result per row) on this rank's shard of `rows`; returns every row's
    result, in row order, on every rank. Collective: every rank calls it with the same rows."""
    own = shard(len(rows), engine.rank(), engine.world_size(), batch_size)
    results = merge(engine.all_gather_object(fn(rows[own.start:own.stop])))
    if len(results) != len(rows):  # a rank count that disagrees with the process group's
        raise RuntimeError(f"held-out check: gathered {len(results)} results for {len(rows)} rows")
    return results


def load_saved(path: str | Path, loader: Callable, cfg: PipelineConfig, tokenizer, **kwargs):
    """A saved model as a user loads it (`loader`: models.load_causal_lm or load_scalar_model), whole on
    every rank (ZeRO-3's load-time partitioning is off meanwhile), on the run's device in `model.dtype`,
    in eval mode."""
    with engine.single_process_loading():
        model = loader(str(path), tokenizer=tokenizer, trust_remote_code=cfg.model.trust_remote_code,
                       dtype=engine.run_dtype(cfg), **kwargs)
    return model.to(engine.device(cfg.run.device)).eval()


def saved_pair_logps(path: str | Path, cfg: PipelineConfig, tokenizer, rows: list[dict], *, mean: bool,
                     batch_size: int) -> list[list[float]]:
    """Per preference row, [chosen, rejected] response log-probs (`evaluation.pair_logps`) of the causal LM
    saved at `path`. Collective."""
    from rlhf import models
    from rlhf.evaluation import pair_logps

    model = load_saved(path, models.load_causal_lm, cfg, tokenizer)
    return map_rows(rows, lambda part: pair_logps(model, tokenizer, part, mean=mean, batch_size=batch_size),
                    batch_size)
