"""A critic-free final stage on 2 CPU ranks under ZeRO-3 (`ppo.advantage: grpo`, 4 samples per prompt),
scored by one reward server (`ppo.rewards: [{url: ...}]`, `rlhf serve` in a thread of the test process)
and a program: each rank scores whole groups of its own prompts (a group's baseline needs no collective)
and posts its own share to the server, which is told nothing about ranks; the ranks' prompts differ, and
the run finishes with two models (actor, reference): no critic and no reward model anywhere in its records."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch import deepspeed_cli, ppo_config  # noqa: E402

from rlhf.commands.serve import build_app, load_scorer, serve_in_thread  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
STAGES = Path(__file__).parents[1] / "stages"  # ppo_reward.py


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


def test_grpo_keeps_each_group_on_one_rank_under_zero3_scored_by_one_server(tmp_path, tiny_model_dir,
                                                                           tiny_reward_dir):
    calls = tmp_path / "calls"
    calls.mkdir()
    scorer, _ = load_scorer(str(tiny_reward_dir), None, device="cpu", dtype="auto", max_batch=16, max_length=128)
    recording = Recording(scorer)
    server, port = serve_in_thread(build_app(recording, name="tiny", token="s3cret"))
    try:
        config = ppo_config(tmp_path, tiny_model_dir, tiny_reward_dir, zero_stage=3, ppo={
            "steps": 1, "advantage": "grpo", "samples_per_prompt": 4, "rollout_batch_size": 2, "mini_batch_size": 4,
            "grad_accum": 2, "save_steps": 1,
            "rewards": [{"url": f"http://127.0.0.1:{port}", "token_env": "RM_TOKEN"},
                        {"source": "ppo_reward:recorded_zero", "weight": 0.0}]})
        env = {"RLHF_TEST_CALLS": str(calls), "RM_TOKEN": "s3cret",
               "PYTHONPATH": os.pathsep.join([str(STAGES), os.environ.get("PYTHONPATH", "")])}
        proc = deepspeed_cli(["ppo", "--config", str(config)], env=env, timeout=400)
    finally:
        server.should_exit = True
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(recording.requests) == 2  # one request per rank for the one step, 2 prompts x 4 samples each
    served = [Counter(r) for r in recording.requests]
    assert all(sorted(c.values()) == [4, 4] for c in served) and not set(served[0]) & set(served[1])
    steps = {rank: [json.loads(line) for line in (calls / f"rank{rank}.jsonl").read_text().splitlines()]
             for rank in (0, 1)}
    assert [len(s) for s in steps.values()] == [1, 1]  # the step's one scoring on each rank
    mine = [Counter(steps[rank][0]) for rank in (0, 1)]
    for counts in mine:  # 2 prompts x 4 samples, every group whole on this rank
        assert sorted(counts.values()) == [4, 4], counts
    assert not set(mine[0]) & set(mine[1])  # each rank its own share of the global batch
    stage = tmp_path / "runs" / "t" / "ppo"
    assert (stage / "stage.json").is_file()
    assert set(json.loads((stage / "memory.json").read_text())["roles"]) == {"actor", "ref"}  # no RM here
    ckpt = stage / "checkpoints" / "checkpoint-1"
    assert (ckpt / "actor").is_dir() and not (ckpt / "critic").exists()
