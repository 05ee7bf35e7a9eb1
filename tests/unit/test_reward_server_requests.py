"""The reward server's request checks and the remote source's client, without a model: what `rlhf serve`
refuses (and with which status), the token rule, the `url` source's config keys, what the client makes of a
wrong answer or no server, and which runs load no reward model."""

from __future__ import annotations

import json
import math
import socket

import pytest

from rlhf.commands.serve import (
    BadRequest,
    check_bind,
    check_token,
    get_reward_request,
    parse_body,
    score_request,
)
from rlhf.config import config_from_dict
from rlhf.errors import ConfigError
from rlhf.remote_reward import RemoteRewardError, RemoteScorer

URL = "http://127.0.0.1:9"


def _status(fn, *args) -> tuple[int, str]:
    with pytest.raises(BadRequest) as err:
        fn(*args)
    assert "\n" not in err.value.reason
    return err.value.status, err.value.reason


def test_each_bad_body_gets_its_status_and_reason():
    assert _status(parse_body, b"x" * 11, 10)[0] == 413
    assert _status(parse_body, b"{not json", 100)[0] == 400
    assert _status(parse_body, b"[1, 2]", 100) == (400, "body must be a JSON object, got list")
    assert _status(score_request, {"prompts": ["a", "b"], "responses": ["x"]}) == (
        422, "prompts has 2 items but responses has 1; send one response per prompt")
    assert _status(score_request, {"prompts": ["a"], "responses": [3]}) == (422, "responses[0] is int, not a string")
    assert _status(score_request, {"prompts": [7], "responses": ["x"]})[1].startswith("prompts[0] must be a string")
    assert _status(score_request, {"prompts": [[{"role": "user"}]], "responses": ["x"]})[0] == 422
    assert _status(score_request, {"prompts": ["a"], "responses": ["x"], "fields": [1]})[0] == 422
    assert _status(score_request, {"prompts": ["a"], "responses": ["x"], "extra": 1})[1].startswith("unknown key(s) extra")
    assert _status(score_request, {"responses": []})[0] == 422
    assert _status(get_reward_request, {"query": "one text"})[0] == 422
    assert _status(get_reward_request, {"query": ["ok", None]}) == (422, "query[1] is NoneType, not a string")


def test_good_bodies_are_read_as_message_lists_with_fields():
    assert parse_body(b'{"a": 1}', 8) == {"a": 1}
    prompts, responses, fields = score_request({"prompts": ["hi", [{"role": "user", "content": "yo"}]],
                                                "responses": ["a", "b"], "fields": [{"answer": 1}, {}]})
    assert prompts == [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    assert responses == ["a", "b"] and fields == [{"answer": 1}, {}]
    assert score_request({"prompts": ["hi"], "responses": ["a"]})[2] == [{}]
    assert get_reward_request({"query": ["t"], "prompts": ["p"], "labels": ["l"]}) == ["t"]  # OpenRLHF's own keys


def test_token_rule():
    check_token(None, None)  # no token set: nothing checked
    check_token("Bearer s3cret", "s3cret")
    assert _status(check_token, None, "s3cret")[0] == 401
    assert _status(check_token, "Bearer wrong", "s3cret")[0] == 401
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "s3cret")
    with pytest.raises(ConfigError, match="--host 0.0.0.0 serves beyond this machine, so it needs a token"):
        check_bind("0.0.0.0", None)


def _ppo(rewards, **ppo) -> object:
    return config_from_dict({"final_stage": "ppo", "model": {"name_or_path": "m"},
                             "ppo": {"rewards": rewards, **ppo}}, source="t.yaml").ppo


def test_url_sources_load_no_reward_model_and_bad_keys_are_named():
    ppo = _ppo([{"url": URL, "token_env": "RM_TOKEN", "weight": 2.0}, {"source": "mod:fn"}], critic_init="sft")
    assert [s.name for s in ppo.reward_sources] == [URL, "mod:fn"]
    assert not ppo.needs_reward_model and not ppo.needs_reward_stage
    assert _ppo([{"url": URL}, {"weight": 0.5}]).needs_reward_model
    for bad, key in (({"url": "127.0.0.1:9"}, "url"), ({"url": URL, "source": "m:f"}, "url"),
                     ({"token_env": "T"}, "token_env"), ({"url": URL, "token_env": "1T"}, "token_env"),
                     ({"url": URL, "timeout_s": 0}, "timeout_s"), ({"url": URL, "retries": -1}, "retries"),
                     ({"url": URL, "protocol": "grpc"}, "protocol")):
        with pytest.raises(ConfigError) as err:
            _ppo([bad])
        assert str(err.value).startswith(f"t.yaml: ppo.rewards[0].{key}:") and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="names a source twice"):
        _ppo([{"url": URL}, {"url": URL}])


def test_a_wrong_answer_is_an_error_naming_the_url_never_a_zero():
    client = RemoteScorer(URL)
    assert client._values({"scores": [1, 0.5]}, 2) == [1.0, 0.5]
    for answer, says in (({"scores": [1.0]}, "returned 1 scores for 2 responses"),
                         ({"scores": [1.0, None]}, "returned None as the score of response 1"),
                         ({"scores": [math.inf, 1.0]}, "returned inf as the score of response 0"),
                         ({"rewards": [1.0, 2.0]}, "answered without a `scores` list")):
        with pytest.raises(RemoteRewardError, match=f"^ppo.rewards: {URL} {says}"):
            client._values(json.loads(json.dumps(answer)), 2)


def test_no_server_fails_after_the_retries_with_one_line(monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = RemoteScorer(url, retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(RemoteRewardError) as err:
        client([{"prompt": [{"role": "user", "content": "q"}]}], ["a"])
    message = str(err.value)
    assert message.startswith(f"ppo.rewards: reward server {url}/score failed after 3 tries: ")
    assert "refused" in message and "\n" not in message
    monkeypatch.delenv("RM_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="token_env names RM_TOKEN, which is not set"):
        RemoteScorer(url, token_env="RM_TOKEN")


def test_a_critic_from_the_reward_model_needs_its_weights_here(tmp_path):
    from rlhf import artifacts, preflight

    raw = {"run": {"name": "t", "output_dir": str(tmp_path)}, "final_stage": "ppo", "model": {"name_or_path": "m"},
           "ppo": {"rewards": [{"url": URL}]}}
    cfg = config_from_dict(raw, source="t.yaml")
    blockers = preflight._check_remote_critic(cfg)
    assert [b.code for b in blockers] == ["reward.critic_init"]
    assert URL in blockers[0].message and "set ppo.critic_init: sft" in blockers[0].message
    for critic in ({"critic_init": "sft"}, {"advantage": "grpo", "samples_per_prompt": 2}):
        assert preflight._check_remote_critic(config_from_dict({**raw, "ppo": {**raw["ppo"], **critic}})) == []
    (tmp_path / "t" / "reward" / "final").mkdir(parents=True)
    artifacts.write_manifest(tmp_path / "t" / "reward", "reward", inputs={}, config_hash="x", metrics={})
    assert preflight._check_remote_critic(cfg) == []  # the reward stage's output is here


def test_the_plan_has_no_reward_model_when_a_server_scores():
    from pathlib import Path

    from rlhf import plan
    from rlhf.config import RewardSourceCfg, load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/llama3-8b/ppo_1x8.yaml")
    cfg.ppo.rewards, cfg.ppo.critic_init = [RewardSourceCfg(url=URL)], "sft"
    text, _ = plan.report(cfg, gpus=8, nodes=1, gpu_mem_gib=None)
    lines = text.splitlines()
    assert {"actor", "critic", "ref"} <= {line.split()[0] for line in lines if line.split()}
    assert [line for line in lines if line.startswith("reward")] == [  # the note, no reward model's row
        f"reward scored over HTTP by {URL}; no reward model is loaded here"]


def test_the_batcher_groups_waiting_requests_up_to_max_batch_and_survives_a_failure():
    import asyncio

    from rlhf.commands.serve import Batcher, Job

    batches = []

    def scorer(jobs):  # scores are the responses' lengths; "boom" fails its whole batch
        batches.append([job.size for job in jobs])
        texts = [r for job in jobs for r in job.responses]
        if "boom" in texts:
            raise RuntimeError("model fell over\nsecond line")
        return [float(len(r)) for r in texts]

    async def main():
        batcher = Batcher(scorer, max_batch=4, max_wait_s=0.05)
        worker = asyncio.create_task(batcher.run())
        loop = asyncio.get_running_loop()

        def job(*responses):
            return Job(loop.create_future(), ["p"] * len(responses), list(responses), [{}] * len(responses))

        # queued together: 1 + 2 pairs fit a batch of 4, the next 2 do not; 6 pairs go alone
        first = await asyncio.gather(*(batcher.submit(j) for j in (job("a"), job("bb", "c"), job("dd", "e"))))
        alone = await batcher.submit(job(*"abcdef"))
        failed = await asyncio.gather(batcher.submit(job("boom")), return_exceptions=True)
        after = await batcher.submit(job("fine"))
        worker.cancel()
        return first, alone, failed, after

    first, alone, failed, after = asyncio.run(main())
    assert first == [[1.0], [2.0, 1.0], [2.0, 1.0]] and alone == [1.0] * 6 and after == [4.0]
    assert batches == [[1, 2], [2], [6], [1], [1]]
    assert isinstance(failed[0], BadRequest) and failed[0].status == 500
    assert failed[0].reason == "scoring failed (RuntimeError: model fell over)"


def test_a_full_queue_answers_busy_and_takes_requests_again_once_it_drains():
    import asyncio

    from rlhf.commands.serve import Batcher, Job

    async def main():
        batcher = Batcher(lambda jobs: [1.0] * sum(job.size for job in jobs), max_batch=4, max_wait_s=0.0,
                          max_queue=5)
        loop = asyncio.get_running_loop()

        def job(n):
            return Job(loop.create_future(), ["p"] * n, ["r"] * n, [{}] * n)

        waiting = asyncio.create_task(batcher.submit(job(4)))  # no worker yet: it waits
        await asyncio.sleep(0)
        with pytest.raises(BadRequest) as busy:
            await batcher.submit(job(2))  # 4 + 2 > 5
        worker = asyncio.create_task(batcher.run())
        first = await waiting
        again = await batcher.submit(job(2))  # the queue drained
        alone = await batcher.submit(job(9))  # over the bound, but nothing waits: a request alone gets in
        worker.cancel()
        return busy.value, first, again, alone

    busy, first, again, alone = asyncio.run(main())
    assert busy.status == 503 and busy.reason.startswith("busy: 4 pairs are waiting (--max-queue 5)")
    assert first == [1.0] * 4 and again == [1.0] * 2 and alone == [1.0] * 9
