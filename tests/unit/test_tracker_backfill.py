"""On resume, `MetricsLogger` sends each tracker the kept lines of metrics.jsonl past the last step that
tracker's store holds: a tracker that lost the end of a killed run, or one new to the stage, ends complete;
one that has everything gets nothing twice."""

from __future__ import annotations

import json

from rlhf import trackers, tracking


class FakeTracker:
    def __init__(self, name: str, last: int | None):
        self.name, self.last, self.logged = name, last, []

    def last_step(self) -> int | None:
        return self.last

    def log(self, step, scalars):
        self.logged.append((step, scalars))

    def finish(self, ok):
        pass


def test_each_tracker_gets_the_steps_its_store_lacks(tmp_path):
    lines = [{"step": 1, "time": 1.0, "loss": 4.0}, {"step": 2, "time": 2.0, "loss": 3.0, "note": "x"},
             {"step": 3, "time": 3.0, "loss": "nan"}, {"step": 3, "time": 3.5, "eval/loss": 2.5},
             {"step": 4, "time": 4.0, "loss": 1.0}]  # step 4: written after checkpoint-3, dropped on resume
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    lost_end, complete, new = FakeTracker("wandb", 1), FakeTracker("mlflow", 3), FakeTracker("trackio", None)
    logger = tracking.MetricsLogger(tmp_path, tensorboard=False, resume_step=3, trackers=[lost_end, complete, new])
    assert lost_end.logged == [(2, {"loss": 3.0}), (3, {"eval/loss": 2.5})]  # "nan" and text: not scalars
    assert complete.logged == []
    assert [step for step, _ in new.logged] == [1, 2, 3]
    logger.log(4, {"loss": 0.5})  # training goes on after the backfill
    assert lost_end.logged[-1] == complete.logged[-1] == (4, {"loss": 0.5})
    logger.close()


def test_a_tracker_that_cannot_read_its_store_warns_once_and_is_left_out(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 4.0}) + "\n")

    class Unreadable(FakeTracker):
        def last_step(self):
            raise ConnectionError("mlflow.example.org: Connection refused")

    broken = Unreadable("mlflow", None)
    tracking.MetricsLogger(tmp_path, tensorboard=False, resume_step=1, trackers=[trackers._Guarded(broken)]).close()
    assert broken.logged == []
    assert [r.getMessage() for r in caplog.records if "report_to" in r.getMessage()] == [
        "logging.report_to: mlflow failed (ConnectionError: mlflow.example.org: Connection refused); it gets no more "
        "metrics from this run, which goes on"]
