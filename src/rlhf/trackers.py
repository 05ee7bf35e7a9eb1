"""Experiment trackers next to TensorBoard and JSONL: Weights & Biases, MLflow and trackio (`logging.report_to`).

A tracker receives exactly what `tracking.MetricsLogger` writes to `metrics.jsonl` (same names, same
steps), from the main rank only. Each stage is one tracker run, named `<run.name>-<stage>`, grouped under
`run.name` (W&B group, MLflow tag, trackio group) in the project `logging.project`, with the resolved config.
The run ids are kept in `<stage dir>/trackers.json`, so a resumed stage continues its run.

A tracker that fails (network gone, server down, disk full) warns once, gets nothing more from this run,
and the run goes on: losing a dashboard never costs a training run. A tracker that is not installed is a
preflight blocker (`missing`), caught before any work starts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("rlhf")

TRACKERS = ("wandb", "mlflow", "trackio")
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}  # what `pip install` takes
IDS_FILE = "trackers.json"


@dataclass(frozen=True)
class RunInfo:
    """What every tracker is told about the stage run it records."""

    project: str
    run: str  # run.name: the group of the pipeline's stages
    stage: str
    stage_dir: Path
    config: dict[str, Any]  # the resolved config
    resume: bool  # the stage resumes from a checkpoint: continue the tracker run kept in trackers.json

    @property
    def name(self) -> str:
        return f"{self.run}-{self.stage}"


class Tracker(Protocol):
    name: str

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def finish(self, ok: bool) -> None: ...


def missing(report_to: list[str]) -> list[str]:
    """The trackers of `report_to` whose package cannot be imported here."""
    return [name for name in report_to if name in TRACKERS and importlib.util.find_spec(name) is None]


def mlflow_store_problem(report_to: list[str]) -> str | None:
    """Why MLflow could not open its store, when that is known before the run: with no MLFLOW_TRACKING_URI,
    MLflow's default is a SQLite file, which needs the full `mlflow` package (SQLAlchemy)."""
    if "mlflow" not in report_to or os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    if importlib.util.find_spec("sqlalchemy") is None:
        return ("MLFLOW_TRACKING_URI is not set, and MLflow's default store (sqlite:///mlflow.db) needs the full "
                "`mlflow` package; set MLFLOW_TRACKING_URI to your server (http://...) or `pip install mlflow`")
    return None


def open_trackers(report_to: list[str], info: RunInfo) -> list[Tracker]:
    """One open tracker per name of `report_to` (tensorboard and jsonl are not trackers here). A tracker
    that cannot start warns and is left out."""
    ids = _read_ids(info.stage_dir) if info.resume else {}
    opened: list[Tracker] = []
    for name in report_to:
        if name not in TRACKERS:
            continue
        try:
            tracker = _OPENERS[name](info, ids.get(name))
        except Exception as err:  # a tracker never stops training
            log.warning("logging.report_to: %s could not start (%s: %s); this run goes on without it",
                        name, type(err).__name__, _short(err))
            continue
        ids[name] = tracker.run_id
        opened.append(_Guarded(tracker))
    if opened:
        _write_ids(info.stage_dir, ids)
    return opened


class _Guarded:
    """A tracker whose first failure is a warning and its last call."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.name = tracker.name
        self.failed = False

    def _call(self, what: str, *args) -> None:
        if self.failed:
            return
        try:
            getattr(self.tracker, what)(*args)
        except Exception as err:
            self.failed = True
            log.warning("logging.report_to: %s failed (%s: %s); it gets no more metrics from this run, which goes on",
                        self.name, type(err).__name__, _short(err))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._call("log", step, scalars)

    def finish(self, ok: bool) -> None:
        self._call("finish", ok)
        self.failed = True  # finished: nothing more goes to it


class _Wandb:
    name = "wandb"

    def __init__(self, info: RunInfo, run_id: str | None):
        import wandb

        kwargs = {} if os.environ.get("WANDB_DIR") else {"dir": str(info.stage_dir)}
        self.run = wandb.init(project=info.project, name=info.name, group=info.run, job_type=info.stage,
                              config=info.config, id=run_id, resume="allow" if run_id else None, **kwargs)
        self.run_id = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class _Mlflow:
    name = "mlflow"

    def __init__(self, info: RunInfo, run_id: str | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        experiment = self.client.get_experiment_by_name(info.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(info.project)
        run = self.client.create_run(experiment_id, run_name=info.name,
                                     tags={"rlhf.run": info.run, "rlhf.stage": info.stage})
        self.run_id = run.info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in _flatten(info.config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in scalars.items()])

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class _Trackio:
    name = "trackio"

    def __init__(self, info: RunInfo, run_id: str | None):
        import trackio

        self.run = trackio.init(project=info.project, name=run_id or info.name, group=info.run,
                                config=info.config, resume="allow" if run_id else "never", embed=False)
        self.run_id = self.run.name

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def finish(self, ok: bool) -> None:
        self.run.finish()


_OPENERS = {"wandb": _Wandb, "mlflow": _Mlflow, "trackio": _Trackio}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"ppo": {"kl_coef": 0.1}} -> {"ppo.kl_coef": 0.1}: nested config as flat parameter names."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _read_ids(stage_dir: Path) -> dict[str, str]:
    try:
        ids = json.loads((stage_dir / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def _write_ids(stage_dir: Path, ids: dict[str, str]) -> None:
    path = stage_dir / IDS_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(ids, indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as err:  # a resumed stage then starts new tracker runs; nothing else depends on it
        log.warning("%s: cannot keep the tracker run ids (%s)", path, err.strerror)


def _short(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."
