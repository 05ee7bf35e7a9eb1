"""Non-finite values (NaN/inf) in losses, gradients, rewards and KL: stop the run, or skip the step.

`run.on_nonfinite: stop` (default) ends the run with a one-line `TrainingError` naming the stage, step and
quantity; nothing non-finite is ever saved, so the last checkpoint stays the resume point.
`run.on_nonfinite: skip` drops the update of the bad step (its gradients are discarded, optimizer and
scheduler state stay as they were) and goes on, with a warning; `run.max_consecutive_skips` skips in a row
mean the fault is persistent, and the run stops as in `stop` mode.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable

from rlhf import artifacts
from rlhf.errors import TrainingError

log = logging.getLogger("rlhf")


def is_finite(value) -> bool:
    """True when a float or every element of a tensor is finite."""
    import torch

    if isinstance(value, (int, float)):
        return math.isfinite(value)
    return bool(torch.isfinite(torch.as_tensor(value)).all())


def grads_finite(params: Iterable) -> bool:
    """True when every present gradient is finite (params without a gradient are ignored)."""
    import torch

    flags = [torch.isfinite(p.grad).all() for p in params if getattr(p, "grad", None) is not None]
    return bool(torch.stack(flags).all()) if flags else True


def drop_nonfinite_grads(params: Iterable) -> bool:
    """When any gradient is NaN/inf, discard all of them and return True. Torch optimizers leave a parameter
    without a gradient untouched (no moment update, no weight decay), so the following `optimizer.step()`
    applies nothing."""
    params = list(params)
    if grads_finite(params):
        return False
    for p in params:
        p.grad = None
    return True


class NonFiniteGuard:
    """Counts skipped steps and builds the messages for one stage run."""

    def __init__(self, stage: str, mode: str, max_consecutive: int, ckpt_dir: Path, hint: str):
        self.stage, self.mode, self.max_consecutive = stage, mode, max_consecutive
        self.ckpt_dir, self.hint = ckpt_dir, hint
        self.total = 0
        self.consecutive = 0

    @property
    def skipping(self) -> bool:
        return self.mode == "skip"

    def stop_error(self, what: str, value, step: int, window: str = "") -> TrainingError:
        kept = artifacts.latest_checkpoint(self.ckpt_dir)
        kept_text = f"the last good checkpoint {kept} is kept" if kept is not None else "no checkpoint was saved yet"
        return TrainingError(f"{self.stage}: {what} is {_show(value)} at step {step}{window}; stopped before saving: "
                             f"{kept_text}. {self.hint}, then re-run the same command")

    def skipped(self, what: str, value, step: int) -> None:
        """Record a skipped step; raises once `max_consecutive` steps in a row were skipped."""
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise self.stop_error(what, value, step, f" ({self.consecutive} steps in a row; "
                                  f"run.max_consecutive_skips={self.max_consecutive})")
        log.warning("%s: %s is %s at step %d; skipped this update (run.on_nonfinite=skip; %d in a row, %d in total)",
                    self.stage, what, _show(value), step, self.consecutive, self.total)

    def ok(self) -> None:
        self.consecutive = 0


def _show(value) -> str:
    import torch

    if isinstance(value, (int, float)):
        return str(float(value))
    t = torch.as_tensor(value).detach().flatten().float()
    bad = t[~torch.isfinite(t)]
    return str(bad[0].item()) if bad.numel() else str(t[:1].tolist())
