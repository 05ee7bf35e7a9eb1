"""Metrics: one JSONL line per log step, TensorBoard scalars and the trackers of `logging.report_to`
(`rlhf.trackers`), written by the main rank only.

Every stage logs through `MetricsLogger` (the Trainer-based ones from the `on_log` of the callback that
`stages.common._make_callback` builds, then once more with their `eval/` report; PPO from its loop), so
`metrics.jsonl`, `logs/` and the trackers look the same everywhere. On resume from step N, lines past N (written after the checkpoint the run resumes from)
are dropped, so a resumed run's curve has no duplicates, and each tracker is sent the lines it lacks
(`_backfill`): `metrics.jsonl` is the record every other sink is made whole from.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rlhf")
_OPEN: set[MetricsLogger] = set()  # loggers not closed yet: `close_open` finishes them when a stage fails


class MetricsLogger:
    def __init__(self, stage_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True,
                 enabled: bool = True, resume_step: int | None = None, trackers: list | None = None):
        """`trackers`: open `rlhf.trackers.Tracker`s, finished by `close`."""
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.jsonl = jsonl and enabled
        self._tb = None
        self.trackers = list(trackers or []) if enabled else []
        if not enabled:
            return
        _OPEN.add(self)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.jsonl:
            self._truncate(resume_step)
            if resume_step is not None:
                self._backfill()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(stage_dir) / "logs"), purge_step=resume_step)

    def _truncate(self, resume_step: int | None) -> None:
        if not self.path.exists():
            return
        if resume_step is None:
            self.path.unlink()
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and _step_of(line) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _backfill(self) -> None:
        """Send each tracker the kept lines (steps up to the resume step) past the last step its store holds,
        so a tracker that lost the end of a killed run (or a tracker run new to this stage) gets every step."""
        rows = [(row["step"], _finite({k: v for k, v in row.items() if k not in ("step", "time")}))
                for row in read_metrics(self.path) if isinstance(row.get("step"), int)]
        for tracker in self.trackers:
            last = tracker.last_step()
            missing = [(step, scalars) for step, scalars in rows if scalars and (last is None or step > last)]
            for step, scalars in missing:
                tracker.log(step, scalars)
            if missing:
                log.info("logging.report_to: %s gets steps %d-%d again from %s (its store ended at step %s)",
                         tracker.name, missing[0][0], missing[-1][0], self.path, last)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            record = {"step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in metrics.items()}}
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        finite = _finite(metrics)
        if self._tb is not None:
            for key, value in finite.items():
                self._tb.add_scalar(key, value, step)
        for tracker in self.trackers:
            tracker.log(step, finite)

    def text(self, step: int, tag: str, value: str) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, value, step)

    def close(self, ok: bool = True) -> None:
        """Flush and close every sink; trackers record the run as finished (`ok`) or failed."""
        _OPEN.discard(self)
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        for tracker in self.trackers:
            tracker.finish(ok)
        self.trackers = []


def close_open(ok: bool) -> None:
    """Close every logger still open: a stage that ended by an error records its tracker runs as failed."""
    for logger in list(_OPEN):
        logger.close(ok)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of `metrics` as floats: what TensorBoard and the trackers take."""
    scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {key: value for key, value in scalars.items() if math.isfinite(value)}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 1 << 62  # unreadable (half-written) line: drop it


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
