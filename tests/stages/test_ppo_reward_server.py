"""`rlhf serve` on loopback with the tiny reward model, and the final stage scored through it (`ppo.rewards:
[{url: ...}]`): OpenRLHF's `/get_reward` agrees with `/score` and with in-process scoring, also through
the stage's client in both protocols, standardised by the reward stats the server reports; every kind of bad request gets its 4xx and the
server carries on; a served program gets the rows' fields; a token-guarded server on a non-loopback bind refuses a request without it; a PPO run
gets the in-process scores at every step with no reward model loaded; a stop answers the requests in
flight first; a server killed mid-run stops the stage with one line, and the stage resumes from its
checkpoint once the server is back.

One server (a thread of this process) serves the module; the kill test's server is a process of its own,
started with the module so that it loads while the other tests run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_ppo import make_cfg, run_ppo

from rlhf import artifacts, preflight, scoring
from rlhf.commands.serve import build_app, load_scorer, serve_in_thread
from rlhf.config import RewardSourceCfg
from rlhf.errors import TrainingError
from rlhf.remote_reward import RemoteScorer, render_text
from rlhf.stages.ppo import remote_scorer
from rlhf.stages.ppo.experience import Scorer

pytestmark = pytest.mark.slow
PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}], "Tell me a joke."]
RESPONSES = ["Paris, of course.", "Why did the chicken cross the road?"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _call(url: str, body=None, *, raw: bytes | None = None, token: str | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def killable(tiny_reward_dir):
    """(process, url) of `rlhf serve` on the tiny reward model, started first so it loads meanwhile."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "serve", "--model", str(tiny_reward_dir), "--port",
                             str(port), "--max-batch", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    yield proc, f"http://127.0.0.1:{port}"
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def served(killable, tiny_reward_dir):
    """(url, scorer): the tiny reward model served from a thread, bodies limited to 64 KiB."""
    scorer, name = load_scorer(str(tiny_reward_dir), None, device="cpu", dtype="auto", max_batch=8, max_length=256)
    server, port = serve_in_thread(build_app(scorer, name=name, max_batch=8, max_body_bytes=64 << 10))
    yield f"http://127.0.0.1:{port}", scorer
    server.should_exit = True


def test_openrlhf_shape_gets_the_scores_of_score_and_of_in_process_scoring(served):
    url, scorer = served
    status, scored = _call(url + "/score", {"prompts": PROMPTS, "responses": RESPONSES})
    assert status == 200
    render = render_text(scorer.tokenizer)
    messages = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in PROMPTS]
    status, rewarded = _call(url + "/get_reward", {"query": [render(p, r) for p, r in zip(messages, RESPONSES, strict=True)]})
    assert status == 200
    in_process = scoring.score(scorer.model, scorer.tokenizer, messages, RESPONSES)
    assert scored["scores"] == pytest.approx(in_process, rel=1e-5, abs=1e-6)
    assert rewarded["rewards"] == pytest.approx(scored["scores"], rel=1e-5, abs=1e-6)
    assert scored["scores"][0] != pytest.approx(scored["scores"][1])  # two pairs, two scores
    rows = [{"prompt": m} for m in messages]  # the final stage's client, in both protocols
    for client in (RemoteScorer(url), RemoteScorer(url, protocol="openrlhf", render=render)):
        assert client(rows, RESPONSES) == pytest.approx(in_process, rel=1e-5, abs=1e-6)
        assert client.health()["kind"] == "reward_model"


def test_a_served_reward_models_scores_are_standardised_by_the_stats_it_reports(served, monkeypatch):
    """With ppo.normalize_reward, as a local reward model's: (score - mean) / std, from the server's /health."""
    url, scorer = served
    monkeypatch.setattr(scorer, "stats", {"mean": 0.5, "std": 2.0})
    messages = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in PROMPTS]
    raw = scoring.score(scorer.model, scorer.tokenizer, messages, RESPONSES)
    rows = [{"prompt": m} for m in messages]
    source = RewardSourceCfg(url=url)
    assert remote_scorer(source, None, True)(rows, RESPONSES) == pytest.approx([(r - 0.5) / 2.0 for r in raw],
                                                                               rel=1e-5, abs=1e-6)
    assert remote_scorer(source, None, False)(rows, RESPONSES) == pytest.approx(raw, rel=1e-5, abs=1e-6)


def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(served):
    url, _ = served
    before = _call(url + "/health")[1]["requests_served"]
    cases = [(413, {"raw": json.dumps({"prompts": ["x"] * 20000, "responses": ["y"] * 20000}).encode()}),
             (400, {"raw": b'{"prompts": ["a"], "responses": '}),
             (422, {"body": {"prompts": ["a", "b"], "responses": ["x"]}}),
             (422, {"body": {"prompts": ["a"], "responses": [{"text": "x"}]}}),
             (422, {"body": {"query": ["fine", 3]}, "path": "/get_reward"})]
    for status, case in cases:
        code, answer = _call(url + case.get("path", "/score"), case.get("body"), raw=case.get("raw"))
        assert (code, isinstance(answer["detail"], str)) == (status, True), answer
        assert "\n" not in answer["detail"]
    status, health = _call(url + "/health")
    assert status == 200 and health["requests_served"] == before  # refused requests are not served ones
    assert {"model", "dtype", "device", "uptime_s"} <= set(health) and health["device"] == "cpu"
    assert _call(url + "/score", {"prompts": PROMPTS, "responses": RESPONSES})[0] == 200


def test_a_request_without_the_token_is_refused_on_a_non_loopback_bind(served):
    _, scorer = served
    server, port = serve_in_thread(build_app(scorer, name="tiny", token="s3cret"), host="0.0.0.0")
    try:
        url = f"http://127.0.0.1:{port}"
        body = {"prompts": PROMPTS, "responses": RESPONSES}
        assert _call(url + "/score", body)[0] == 401
        assert _call(url + "/health", token="wrong")[0] == 401
        assert _call(url + "/score", body, token="s3cret")[0] == 200
    finally:
        server.should_exit = True


def test_a_served_program_gets_the_rows_fields():
    from rlhf.commands.serve import ProgramScorer
    from rlhf.programs import Program, load_program

    program = Program("ppo_reward:answer_seen", load_program("ppo_reward:answer_seen"), "--program")
    server, port = serve_in_thread(build_app(ProgramScorer(program), name="answer_seen"))
    try:
        url = f"http://127.0.0.1:{port}"
        body = {"prompts": ["2+2?", "3+3?"], "responses": ["it is 4", "it is 5"],
                "fields": [{"answer": "4"}, {"answer": "6"}]}
        assert _call(url + "/score", body) == (200, {"scores": [1.0, 0.0]})
        assert _call(url + "/get_reward", {"query": ["text"]})[0] == 422  # a program needs the pairs apart
    finally:
        server.should_exit = True


def test_a_stop_answers_the_requests_in_flight_first():
    """What Ctrl-C or SIGTERM does to `rlhf serve` (uvicorn's handler sets `should_exit`): a request being
    scored when the stop comes still gets its scores; the server then closes."""
    import threading

    class Slow:
        kind = "program"

        def describe(self) -> dict:
            return {}

        def __call__(self, jobs):
            time.sleep(0.5)
            return [float(len(r)) for job in jobs for r in job.responses]

    server, port = serve_in_thread(build_app(Slow(), name="slow"))
    answers = []
    client = threading.Thread(target=lambda: answers.append(_call(f"http://127.0.0.1:{port}/score",
                                                                  {"prompts": ["q"], "responses": ["abc"]})))
    client.start()
    time.sleep(0.2)  # the request is being scored
    server.should_exit = True
    client.join(10)
    assert answers == [(200, {"scores": [3.0]})]
    deadline = time.monotonic() + 10
    while any(listener.is_serving() for listener in server.servers):
        assert time.monotonic() < deadline, "the server did not close"
        time.sleep(0.05)
    with pytest.raises(OSError):
        _call(f"http://127.0.0.1:{port}/health")


def test_ppo_scored_by_the_server_gets_the_in_process_scores_at_every_step(tmp_path, tiny_model_dir, served,
                                                                           monkeypatch):
    url, scorer = served
    compared = []
    own_call = Scorer.__call__

    def recording(self, rollout, chunks):  # the served scores next to the in-process scorer's for the same pairs
        out = own_call(self, rollout, chunks)
        compared.append((out[url].tolist(), scoring.score(scorer.model, scorer.tokenizer, rollout.prompts,
                                                          rollout.responses)))
        return out

    monkeypatch.setattr(Scorer, "__call__", recording)
    cfg = make_cfg(tmp_path, tiny_model_dir, None, steps=2, ppo_epochs=1, grad_accum=1, critic_init="sft",
                   rollout_batch_size=4, rewards=[{"url": url, "weight": 2.0}], missing_eos_penalty=None)
    engines = []
    result, seen = run_ppo(cfg, on_step=lambda ctx, stats: engines.append(ctx.scorer.engine))
    assert len(compared) == 2 and engines == [None, None]  # two steps, no reward model in this process
    for (remote, local), stats in zip(compared, seen, strict=True):
        assert remote == pytest.approx(local, rel=1e-5, abs=1e-6)
        assert stats["objective/score_raw_mean"] == pytest.approx(2.0 * sum(local) / len(local), rel=1e-5, abs=1e-6)
    stage = result.final_dir.parent
    assert set(json.loads((stage / "memory.json").read_text())["roles"]) == {"actor", "critic", "ref"}
    assert json.loads((stage / "stage.json").read_text())["inputs"]["reward"] == f"url:{url}"


def _wait_for(url: str, proc, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try:
            if _call(url + "/health")[0] == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer /health within {limit_s} s")


def test_server_killed_mid_run_stops_with_one_line_then_resumes(tmp_path, tiny_model_dir, served, killable):
    proc, url = killable
    _wait_for(url, proc)
    cfg = make_cfg(tmp_path, tiny_model_dir, None, steps=2, ppo_epochs=1, grad_accum=1, critic_init="sft",
                   rollout_batch_size=4, advantage="rloo", samples_per_prompt=2,
                   rewards=[{"url": url, "retries": 1, "timeout_s": 10}])
    assert preflight._check_programs(cfg) == []  # the server answers /health

    def kill_after_first(ctx, stats):
        if ctx.step == 1:
            proc.kill()
            proc.wait()

    with pytest.raises(TrainingError) as err:
        run_ppo(cfg, on_step=kill_after_first)
    message = str(err.value)
    assert message.startswith(f"ppo.rewards: reward server {url}/score failed after 2 tries: ") and "\n" not in message
    ckpts = tmp_path / "runs" / "t" / "ppo" / "checkpoints"
    assert artifacts.latest_checkpoint(ckpts).name == "checkpoint-1"
    blockers = preflight._check_programs(cfg)  # before any weights load, the next start names the dead server
    assert [b.code for b in blockers] == ["reward.server"] and url in blockers[0].message
    _, scorer = served
    server, _ = serve_in_thread(build_app(scorer, name="back"), port=int(url.rsplit(":", 1)[1]))  # back, same port
    try:
        result, seen = run_ppo(cfg)
    finally:
        server.should_exit = True
    assert [s["step"] for s in seen] == [2]
    assert json.loads((result.final_dir.parent / "stage.json").read_text())["global_step"] == 2


if __name__ == "__main__":
    sys.exit(pytest.main([str(Path(__file__)), "-q"]))
