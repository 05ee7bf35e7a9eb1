"""MetricsLogger's sinks: a tracker gets the finite scalars of each log call under the metrics.jsonl names
and steps, and a logger still open when a stage fails records its tracker runs as failed."""

from __future__ import annotations

import math

from rlhf import trackers, tracking


class FakeTracker:
    name = "fake"

    def __init__(self, fail_on_log: int | None = None):
        self.logged: list[tuple[int, dict]] = []
        self.finished: list[bool] = []
        self.fail_on_log = fail_on_log

    def log(self, step, scalars):
        if self.fail_on_log is not None and len(self.logged) + 1 >= self.fail_on_log:
            raise OSError("disk full")
        self.logged.append((step, scalars))

    def finish(self, ok):
        self.finished.append(ok)


def test_a_tracker_gets_the_finite_scalars_and_a_failed_stage_closes_it_as_failed(tmp_path):
    fake = FakeTracker()
    logger = tracking.MetricsLogger(tmp_path, tensorboard=False, trackers=[fake])
    logger.log(1, {"loss": 1.5, "eval/acc": 1, "flag": True, "bad": math.nan, "note": "text"})
    logger.log(2, {"loss": 1.25})
    assert fake.logged == [(1, {"loss": 1.5, "eval/acc": 1.0}), (2, {"loss": 1.25})]
    assert [r["step"] for r in tracking.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    tracking.close_open(ok=False)  # what run_stage does when a stage ends by an error
    assert fake.finished == [False]
    logger.close()  # already closed: the tracker is not finished twice
    assert fake.finished == [False]


def test_a_finished_logger_is_not_closed_again_by_a_later_failure(tmp_path):
    fake = FakeTracker()
    logger = tracking.MetricsLogger(tmp_path, tensorboard=False, trackers=[fake])
    logger.close()
    tracking.close_open(ok=False)
    assert fake.finished == [True]


def test_a_guarded_tracker_warns_once_and_is_dropped(tmp_path, caplog):
    fake = FakeTracker(fail_on_log=2)
    logger = tracking.MetricsLogger(tmp_path, tensorboard=False, trackers=[trackers._Guarded(fake)])
    for step in (1, 2, 3):
        logger.log(step, {"loss": float(step)})
    logger.close()
    assert fake.logged == [(1, {"loss": 1.0})] and fake.finished == []
    assert [r.getMessage() for r in caplog.records] == [
        "logging.report_to: fake failed (OSError: disk full); it gets no more metrics from this run, which goes on"]
    assert [r["step"] for r in tracking.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_nested_config_becomes_flat_parameter_names():
    assert trackers._flatten({"ppo": {"kl_coef": 0.1, "lora": {"r": 8}}, "final_stage": "ppo", "empty": {}}) == {
        "ppo.kl_coef": 0.1, "ppo.lora.r": 8, "final_stage": "ppo", "empty": {}}
