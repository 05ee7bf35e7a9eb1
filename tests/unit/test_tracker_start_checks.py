"""A tracker of `logging.report_to` that cannot start here is a preflight blocker, in `rlhf preflight` and at
a stage's start, before any model loads: W&B with no API key outside offline mode, an MLflow store MLflow
refuses, a trackio directory that cannot be written. Each case is checked against the installed package
(wandb's settings and key checks, MlflowClient); nothing goes over the network."""

from __future__ import annotations

import importlib.util

import pytest
import yaml
from test_preflight import _tiny

from rlhf import preflight
from rlhf.config import config_from_dict
from rlhf.preflight import PreflightError
from rlhf.stages import run_stage

VALID_KEY = "k" * 40  # the form wandb accepts (40+ characters); never sent anywhere here


@pytest.fixture
def no_tracker_env(tmp_path, monkeypatch):
    """No W&B key, mode or settings file, no MLflow URI, and trackio in tmp_path: whatever this machine has."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL",
                "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "TRACKIO_SPACE_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # wandb reads $NETRC before ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    return monkeypatch


def _blockers(tmp_path, report_to: list[str]) -> list[tuple[str, str]]:
    raw = _tiny(tmp_path)
    raw["logging"]["report_to"] = report_to
    return [(b.code, b.message) for b in preflight.check(config_from_dict(raw, source="cfg.yaml"), ["sft"])]


def test_wandb_needs_a_key_or_offline_mode(tmp_path, no_tracker_env):
    assert _blockers(tmp_path, ["wandb"]) == [
        ("tracker.wandb_auth", "cfg.yaml: logging.report_to has wandb, but W&B has no API key here (WANDB_API_KEY, "
                               "~/.netrc) and is not in offline mode; run `wandb login`, set WANDB_API_KEY, or set "
                               "WANDB_MODE=offline (`wandb sync` uploads the run later)")]
    for mode in ("offline", "disabled"):
        no_tracker_env.setenv("WANDB_MODE", mode)
        assert _blockers(tmp_path, ["wandb"]) == [], mode
    no_tracker_env.delenv("WANDB_MODE")
    (tmp_path / "no-netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {VALID_KEY}\n")
    assert _blockers(tmp_path, ["wandb"]) == []  # `wandb login` wrote the key to the netrc file
    no_tracker_env.setenv("WANDB_API_KEY", "abc")  # the variable wins over the netrc file, as in wandb.init
    ((code, message),) = _blockers(tmp_path, ["wandb"])
    assert code == "tracker.wandb_auth" and "wandb, but its API key is not valid (API key must have 40+ characters" in message


def test_mlflow_needs_a_store_it_opens(tmp_path, no_tracker_env):
    store = (tmp_path / "mlruns").as_uri()
    no_tracker_env.setenv("MLFLOW_TRACKING_URI", store)
    assert _blockers(tmp_path, ["mlflow"]) == [
        ("tracker.mlflow_store", f"cfg.yaml: logging.report_to has mlflow, but MLflow refuses its file store "
                                 f"(MLFLOW_TRACKING_URI={store}) unless MLFLOW_ALLOW_FILE_STORE=true; set that, or "
                                 "point MLFLOW_TRACKING_URI at your server (http://...)")]
    no_tracker_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert _blockers(tmp_path, ["mlflow"]) == []
    no_tracker_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org:5000")  # a server: not contacted here
    assert _blockers(tmp_path, ["mlflow"]) == []
    if importlib.util.find_spec("sqlalchemy") is None:  # mlflow-skinny, as scripts/setup.sh installs it
        no_tracker_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        ((code, message),) = _blockers(tmp_path, ["mlflow"])
        assert code == "tracker.mlflow_store" and "needs the full `mlflow` package (SQLAlchemy)" in message


def test_trackio_needs_a_directory_it_can_write(tmp_path, no_tracker_env):
    (tmp_path / "a-file").write_text("")
    no_tracker_env.setenv("TRACKIO_DIR", str(tmp_path / "a-file" / "trackio"))
    ((code, message),) = _blockers(tmp_path, ["trackio"])
    assert (code, message) == ("tracker.trackio_dir", f"cfg.yaml: logging.report_to has trackio, but trackio cannot "
                               f"write its directory {tmp_path / 'a-file' / 'trackio'} (Not a directory); set "
                               "TRACKIO_DIR to a writable directory")
    no_tracker_env.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    assert _blockers(tmp_path, ["trackio"]) == []


def test_a_stage_checks_its_trackers_before_it_loads_a_model(tmp_path, no_tracker_env):
    raw = _tiny(tmp_path)
    raw["logging"]["report_to"] = ["tensorboard", "wandb"]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(PreflightError) as caught:
        run_stage("sft", config_from_dict(raw, source=str(tmp_path / "cfg.yaml")))
    assert [b.code for b in caught.value.blockers] == ["tracker.wandb_auth"]
    assert not (tmp_path / "runs" / "tiny" / "sft").exists()  # nothing claimed, loaded or written
