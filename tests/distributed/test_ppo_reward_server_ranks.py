"""PPO on 2 CPU ranks scored by one reward server (`ppo.rewards: [{url: ...}]`): each rank posts its own
rows, the server is told nothing about ranks, and no rank loads a reward model. The server runs in a thread
of the test process (idle while the launcher runs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from launch import deepspeed_cli, ppo_config  # noqa: E402

from rlhf.commands.serve import build_app, load_scorer, serve_in_thread  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


class Recording:
    """The served scorer, keeping the last message of each request's prompts."""

    kind = "reward_model"

    def __init__(self, inner):
        self.inner, self.requests = inner, []

    def describe(self) -> dict:
        return self.inner.describe()

    def __call__(self, jobs):
        self.requests += [[p[-1]["content"] for p in job.prompts] for job in jobs]
        return self.inner(jobs)


def test_two_ranks_each_send_their_own_share_to_one_server(tmp_path, tiny_model_dir, tiny_reward_dir):
    scorer, _ = load_scorer(str(tiny_reward_dir), None, device="cpu", dtype="auto", max_batch=16, max_length=128)
    recording = Recording(scorer)
    server, port = serve_in_thread(build_app(recording, name="tiny", token="s3cret"))
    try:
        config = ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, zero_stage=0,
                            ppo={"steps": 1, "rollout_batch_size": 2, "mini_batch_size": 2, "critic_init": "sft",
                                 "rewards": [{"url": f"http://127.0.0.1:{port}", "token_env": "RM_TOKEN"}]})
        raw = yaml.safe_load(config.read_text())
        raw["deepspeed"] = {"enabled": False}  # plain engines under the launcher: the cheapest 2-rank run
        config.write_text(yaml.safe_dump(raw))
        proc = deepspeed_cli(["ppo", "--config", str(config)], env={"RM_TOKEN": "s3cret"})
    finally:
        server.should_exit = True
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(recording.requests) == 2  # one request per rank for the one step
    first, second = (set(r) for r in recording.requests)
    assert len(first) == len(second) == 2 and not first & second  # each rank's own prompts
    stage = tmp_path / "runs" / "t" / "ppo"
    assert "reward" not in json.loads((stage / "memory.json").read_text())["roles"]
    assert json.loads((stage / "stage.json").read_text())["global_step"] == 1
