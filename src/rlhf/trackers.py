"""Experiment trackers next to TensorBoard and JSONL: Weights & Biases, MLflow and trackio (`logging.report_to`).

A tracker receives exactly what `tracking.MetricsLogger` writes to `metrics.jsonl` (same names, same
steps), from the main rank only. Each stage is one tracker run, named `<run.name>-<stage>`, grouped under
`run.name` (W&B group, MLflow tag, trackio group) in the project `logging.project`, with the resolved config.
The run ids are kept in `<stage dir>/trackers.json`, so a resumed stage continues its run.

A tracker that is not installed (`missing`) or cannot start here (`start_problem`: no W&B key outside
offline mode, a store MLflow will not open, a trackio directory it cannot write) is a preflight blocker,
caught before any work starts, by `rlhf preflight` and again at each stage's start. A tracker that fails
later (network gone, server down, disk full) warns once, gets nothing more from this run, and the run goes
on: losing a dashboard never costs a training run. On resume each tracker is sent the lines of
`metrics.jsonl` past the last step it holds (`last_step`, `tracking.MetricsLogger`): a kill loses what a
tracker had not written down yet (W&B offline buffers up to 15 s), never what the run logged.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
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

    def last_step(self) -> int | None:
        """The highest step this tracker run holds (None: none), read back from its store."""
        ...

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def finish(self, ok: bool) -> None: ...


def missing(report_to: list[str]) -> list[str]:
    """The trackers of `report_to` whose package cannot be imported here."""
    return [name for name in report_to if name in TRACKERS and importlib.util.find_spec(name) is None]


def start_problem(name: str) -> str | None:
    """Why tracker `name` (installed) could not start here, checked the way `open_trackers` will start it,
    or None: W&B needs an API key (WANDB_API_KEY, ~/.netrc, its settings file) unless in offline or
    disabled mode; MLflow must open its store; trackio must write its directory. Nothing goes over the
    network: a server that is down is still found only when the run starts."""
    return {"wandb": _wandb_problem, "mlflow": _mlflow_problem, "trackio": _trackio_problem}[name]()


def _wandb_problem() -> str | None:
    from wandb.errors import AuthenticationError
    from wandb.sdk.lib import wbauth
    from wandb.sdk.wandb_settings import Settings

    # The settings `wandb.init` starts from (its settings file, then the WANDB_* variables), built afresh:
    # wandb's own copy is read once per process and would miss a variable set since.
    settings = Settings()
    settings.settings_system = str(Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
                                   / "settings")
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    if settings._offline or settings._noop:
        return None
    try:
        if settings.api_key:
            wbauth.AuthApiKey(host=settings.base_url, api_key=settings.api_key)  # checks the key's form
            return None
        if settings.identity_token_file or wbauth.read_netrc_auth(host=settings.base_url):
            return None
    except AuthenticationError as err:
        return f"its API key is not valid ({_short(err)}); fix WANDB_API_KEY or ~/.netrc (`wandb login --relogin`)"
    return ("W&B has no API key here (WANDB_API_KEY, ~/.netrc) and is not in offline mode; run `wandb login`, "
            "set WANDB_API_KEY, or set WANDB_MODE=offline (`wandb sync` uploads the run later)")


def _mlflow_problem() -> str | None:
    from urllib.parse import urlparse

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and importlib.util.find_spec("sqlalchemy") is None:
        return ("MLFLOW_TRACKING_URI is not set, and MLflow's default store (sqlite:///mlflow.db) needs the full "
                "`mlflow` package; set MLFLOW_TRACKING_URI to your server (http://...), or to file:./mlruns with "
                "MLFLOW_ALLOW_FILE_STORE=true, or `pip install mlflow`")
    from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient()  # opens the store as _Mlflow does; a server is not contacted yet
    except Exception as err:
        scheme = urlparse(uri or "").scheme.split("+")[0]  # postgresql+psycopg2 -> postgresql
        if scheme in ("", "file") and not MLFLOW_ALLOW_FILE_STORE.get():
            return (f"MLflow refuses its file store (MLFLOW_TRACKING_URI={uri}) unless MLFLOW_ALLOW_FILE_STORE=true; "
                    "set that, or point MLFLOW_TRACKING_URI at your server (http://...)")
        if scheme in ("sqlite", "postgresql", "mysql", "mssql") and importlib.util.find_spec("sqlalchemy") is None:
            return (f"MLFLOW_TRACKING_URI={uri} needs the full `mlflow` package (SQLAlchemy); `pip install mlflow`, "
                    "or use a server (http://...) or file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true")
        return f"MLflow cannot open MLFLOW_TRACKING_URI={uri} ({type(err).__name__}: {_short(err)}); fix the URI"
    return None


def _trackio_problem() -> str | None:
    if os.environ.get("TRACKIO_SPACE_ID"):
        return None  # logs to a Hugging Face Space, not to a local directory
    from huggingface_hub import constants

    where = Path(os.environ.get("TRACKIO_DIR") or Path(constants.HF_HOME) / "trackio")  # trackio's own choice
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".write-test-"):
            pass
    except OSError as err:
        return f"trackio cannot write its directory {where} ({err.strerror}); set TRACKIO_DIR to a writable directory"
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

    def _call(self, what: str, *args) -> Any:
        if self.failed:
            return None
        try:
            return getattr(self.tracker, what)(*args)
        except Exception as err:
            self.failed = True
            log.warning("logging.report_to: %s failed (%s: %s); it gets no more metrics from this run, which goes on",
                        self.name, type(err).__name__, _short(err))
            return None

    def last_step(self) -> int | None:
        return self._call("last_step")

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

    def last_step(self) -> int | None:
        """Online: where the server's history ends (wandb resumes a run at the step after it). Offline: the
        highest step in this run's earlier offline files (one per process; a killed process's file lacks what
        wandb had not flushed), read with wandb's own reader."""
        if self.run.disabled:
            return None
        if not self.run.offline:
            return self.run.starting_step - 1 if self.run.starting_step else None
        current = Path(self.run.settings.sync_file)
        parts = current.parent.parent.glob(f"offline-run-*-{self.run_id}/run-{self.run_id}.wandb")
        return max((step for part in parts if part != current for step in _wandb_file_steps(part)), default=None)

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
        self.resumed = run_id is not None
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

    def last_step(self) -> int | None:
        """The highest step of any metric of the run (each log reached the store before it returned)."""
        if not self.resumed:
            return None
        keys = self.client.get_run(self.run_id).data.metrics
        return max((m.step for key in keys for m in self.client.get_metric_history(self.run_id, key)), default=None)

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

    def last_step(self) -> int | None:
        """The highest step of the run in trackio's local database (where its writer thread got to)."""
        from trackio.sqlite_storage import SQLiteStorage

        return SQLiteStorage.get_max_step_for_run(self.run.project, self.run.name)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def finish(self, ok: bool) -> None:
        self.run.finish()


_OPENERS = {"wandb": _Wandb, "mlflow": _Mlflow, "trackio": _Trackio}


def _wandb_file_steps(path: Path) -> list[int]:
    """The history steps of a W&B `.wandb` run file, read by `wandb leet inspect --json` (wandb's reader,
    which also reads the complete records of a file cut short by a kill); [] when it cannot be read."""
    try:
        done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return []
    steps = []
    for line in done.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "history":
            steps.append(int(record["history"].get("step", {}).get("num", 0)))
    return steps


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
