"""`rlhf serve`: a reward model (or a program reward) scoring over HTTP, for a final stage elsewhere.

    POST /score       {"prompts": [...], "responses": [...], "fields": [{...}, ...]}  ->  {"scores": [...]}
    POST /get_reward  {"query": [...]}   (OpenRLHF's shape: whole rendered texts)       ->  {"rewards": [...]}
    GET  /health      model, kind, dtype, device, uptime, requests served, the reward stats when stored

A prompt is a message list (a string is one user message); `fields` (optional, one mapping per prompt)
are the prompt rows' extra fields a program reward may read. Each pair is scored as `rlhf.scoring` scores
it in process: the prompt rendered for generation by the served model's chat template, the response, EOS,
the score read at the last token. A `/get_reward` query is taken as that whole text already rendered: it is
tokenized as it is, with EOS appended unless it already ends with it.

Requests wait in one asyncio queue; a worker takes what is there, up to `--max-batch` pairs (waiting at
most `--max-wait-ms` for more when its last batch held several requests), and scores it in a thread, off
the event loop, so requests keep arriving while the model runs. Bad requests get a 4xx with a one-line reason (`{"detail": ...}`) and the server
carries on. A token (`--token`, else the RLHF_SERVE_TOKEN variable) is checked on every request when set,
and binding beyond loopback requires one. Ctrl-C or SIGTERM stops taking connections, answers the
requests in flight, then exits.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations (`Request`, imported
# inside `build_app`) as objects at definition time.
import asyncio
import hmac
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from rlhf import encoding
from rlhf.errors import ConfigError

log = logging.getLogger("rlhf")
TOKEN_ENV = "RLHF_SERVE_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# ------------------------------------------------------------------------------------------ requests


def parse_body(body: bytes, limit: int) -> dict:
    """The request's JSON object; BadRequest 413 over `limit` bytes, 400 when it is not a JSON object."""
    if len(body) > limit:
        raise BadRequest(413, f"body of {len(body)} bytes is over the limit of {limit}; send fewer pairs per request")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(400, f"body is not valid JSON ({err})") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, f"body must be a JSON object, got {type(payload).__name__}")
    return payload


def _messages(prompt: Any, i: int) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    ok = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)
    if not ok:
        raise BadRequest(422, f"prompts[{i}] must be a string or a list of {{role, content}} messages with string "
                              "values")
    return prompt


def _strings(payload: dict, key: str) -> list[str]:
    items = payload.get(key)
    if not isinstance(items, list):
        raise BadRequest(422, f"`{key}` must be a list, got {type(items).__name__ if key in payload else 'nothing'}")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BadRequest(422, f"{key}[{i}] is {type(item).__name__}, not a string")
    return items


def score_request(payload: dict) -> tuple[list[list[dict]], list[str], list[dict]]:
    """(prompts as message lists, responses, fields per row) of a `/score` body; BadRequest 422 otherwise."""
    unknown = sorted(set(payload) - {"prompts", "responses", "fields"})
    if unknown:
        raise BadRequest(422, f"unknown key(s) {', '.join(unknown)}; send prompts, responses and optionally fields")
    prompts = payload.get("prompts")
    if not isinstance(prompts, list):
        raise BadRequest(422, "`prompts` must be a list (of strings or message lists)")
    responses = _strings(payload, "responses")
    if len(prompts) != len(responses):
        raise BadRequest(422, f"prompts has {len(prompts)} items but responses has {len(responses)}; send one "
                              "response per prompt")
    fields = payload.get("fields", [{}] * len(prompts))
    if not isinstance(fields, list) or len(fields) != len(prompts) or not all(isinstance(f, dict) for f in fields):
        raise BadRequest(422, "`fields` must be a list of objects, one per prompt")
    return [_messages(p, i) for i, p in enumerate(prompts)], responses, fields


def get_reward_request(payload: dict) -> list[str]:
    """The texts of an OpenRLHF `/get_reward` body (`query`; its other keys, such as `prompts` and `labels`,
    are OpenRLHF's own and not read)."""
    return _strings(payload, "query")


def check_token(header: str | None, token: str | None) -> None:
    """BadRequest 401 unless `header` is `Bearer <token>` (nothing is checked without a token)."""
    if token is None:
        return
    given = (header or "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise BadRequest(401, "missing or wrong token; send the header `Authorization: Bearer <token>`")


def check_bind(host: str, token: str | None) -> None:
    """ConfigError when `host` reaches beyond this machine and no token guards it."""
    if host not in LOOPBACK and not token:
        raise ConfigError(f"--host {host} serves beyond this machine, so it needs a token: pass --token or set "
                          f"{TOKEN_ENV} (clients send it as `Authorization: Bearer <token>`)")


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class Job:
    """One request's pairs (`prompts`, `responses`, `fields`) or whole texts (`texts`), and its answer."""

    future: asyncio.Future
    prompts: list = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    fields: list[dict] = field(default_factory=list)
    texts: list[str] | None = None

    @property
    def size(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.responses)


class ModelScorer:
    """A reward model on one device: pairs rendered by its tokenizer's chat template, texts tokenized as
    they are, all scored together in batches of `batch_size` (`rlhf.scoring.score_sequences`)."""

    kind = "reward_model"

    def __init__(self, model, tokenizer, *, batch_size: int, max_length: int, stats: dict | None = None):
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        self.stats = stats

    def describe(self) -> dict:
        param = next(self.model.parameters())
        return {"dtype": str(param.dtype).removeprefix("torch."), "device": str(param.device),
                "reward_stats": self.stats}

    def __call__(self, jobs: list[Job]) -> list[float]:
        from rlhf.scoring import score_sequences

        sequences = []
        for job in jobs:
            if job.texts is not None:
                sequences += [encoding.response_ids(self.tokenizer, text) for text in job.texts]
            else:
                pairs = zip(job.prompts, job.responses, strict=True)
                sequences += [encoding.encode(self.tokenizer, p, r)[0] for p, r in pairs]
        return score_sequences(self.model, self.tokenizer, sequences, batch_size=self.batch_size,
                               max_length=self.max_length)


class ProgramScorer:
    """A program reward (`rlhf.programs.Program`): one call over every pair of the batch, with its rows' fields."""

    kind = "program"

    def __init__(self, program):
        self.program = program

    def describe(self) -> dict:
        return {"dtype": None, "device": "cpu", "reward_stats": None}

    def __call__(self, jobs: list[Job]) -> list[float]:
        rows = [{"prompt": p, "fields": f} for job in jobs for p, f in zip(job.prompts, job.fields, strict=True)]
        return self.program(rows, [r for job in jobs for r in job.responses])


class Batcher:
    """The queue of jobs and the worker that scores them: whatever is waiting, up to `max_batch` pairs (a
    larger request alone), in a thread. It waits up to `max_wait_s` for more only when the batch before
    held several requests: a lone client would only lose the wait (bench/serve_reward.py measures both).
    At most `max_queue` pairs wait: a request past that is refused with a 503 (busy), which clients retry."""

    def __init__(self, scorer: Callable[[list[Job]], list[float]], max_batch: int, max_wait_s: float,
                 max_queue: int = 4096):
        self.scorer, self.max_batch, self.max_wait_s, self.max_queue = scorer, max_batch, max_wait_s, max_queue
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.waiting = 0  # pairs queued (or held) and not yet taken into a batch
        self.held: Job | None = None  # taken from the queue, but past the last batch's size
        self.last_jobs = 1  # requests in the batch before

    async def submit(self, job: Job) -> list[float]:
        if self.waiting and self.waiting + job.size > self.max_queue:  # one request alone always gets in
            raise BadRequest(503, f"busy: {self.waiting} pairs are waiting (--max-queue {self.max_queue}); "
                                  "retry shortly")
        self.waiting += job.size
        await self.queue.put(job)
        return await job.future

    async def _next(self, timeout: float | None) -> Job:
        """The next job: the held one, one already queued, else one that arrives within `timeout` (None: ever)."""
        if self.held is not None:
            job, self.held = self.held, None
            return job
        if timeout is None:
            return await self.queue.get()
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            if timeout <= 0:
                raise asyncio.TimeoutError from None
            return await asyncio.wait_for(self.queue.get(), timeout)

    async def _batch(self) -> list[Job]:
        jobs = await self._gather()
        self.waiting -= sum(job.size for job in jobs)
        return jobs

    async def _gather(self) -> list[Job]:
        jobs = [await self._next(None)]
        total, deadline = jobs[0].size, time.monotonic() + (self.max_wait_s if self.last_jobs > 1 else 0.0)
        while total < self.max_batch:
            try:
                job = await self._next(max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                break
            if total + job.size > self.max_batch:
                self.held = job
                break
            jobs.append(job)
            total += job.size
        self.last_jobs = len(jobs)
        return jobs

    async def run(self) -> None:
        while True:
            jobs = await self._batch()
            try:
                scores = await asyncio.to_thread(self.scorer, jobs)
            except Exception as err:  # the model or program failed: these requests get a 500, the server goes on
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(BadRequest(500, f"scoring failed ({reason.rstrip(': ')})"))
                continue
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(scores[start:start + job.size])
                start += job.size


# ------------------------------------------------------------------------------------------ the app


async def read_body(request, limit: int) -> dict:
    """The JSON object of `request`'s body (`parse_body`), read no further than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"body of {declared} bytes is over the limit of {limit}; send fewer pairs per request")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            break
    return parse_body(bytes(body), limit)


def build_app(scorer, *, name: str, max_batch: int = 64, max_wait_s: float = 0.002, token: str | None = None,
              max_body_bytes: int = 8 << 20, max_queue: int = 4096):
    """The FastAPI app serving `scorer` (a `ModelScorer` or `ProgramScorer`) under `name`."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse

    state = {"started": time.time(), "served": 0}

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(scorer, max_batch, max_wait_s, max_queue)
        worker = asyncio.create_task(batcher.run())
        app.state.batcher = batcher
        yield
        worker.cancel()

    async def authorised(request: Request) -> None:
        check_token(request.headers.get("authorization"), token)

    app = FastAPI(title="rlhf reward server", lifespan=lifespan, dependencies=[Depends(authorised)])

    @app.exception_handler(BadRequest)
    async def refused(request: Request, err: BadRequest):
        return JSONResponse({"detail": err.reason}, status_code=err.status)

    async def scored(job: Job) -> list[float | None]:
        scores = await app.state.batcher.submit(job) if job.size else []
        state["served"] += 1
        return [s if math.isfinite(s) else None for s in scores]  # JSON has no NaN: null, which clients refuse

    @app.post("/score")
    async def score(request: Request):
        prompts, responses, fields = score_request(await read_body(request, max_body_bytes))
        future = asyncio.get_running_loop().create_future()
        return {"scores": await scored(Job(future, prompts, responses, fields))}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        texts = get_reward_request(await read_body(request, max_body_bytes))
        if scorer.kind != "reward_model":
            raise BadRequest(422, "this server scores with a program, which needs prompts and responses apart; "
                                  "POST /score instead")
        future = asyncio.get_running_loop().create_future()
        return {"rewards": await scored(Job(future, texts=texts))}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "kind": scorer.kind, **scorer.describe(),
                "uptime_s": round(time.time() - state["started"], 3), "requests_served": state["served"],
                "max_batch": max_batch}

    return app


# ------------------------------------------------------------------------------------------ the command


def load_scorer(model: str | None, program: str | None, *, device: str, dtype: str, max_batch: int,
                max_length: int):
    """(scorer, name) for `--model` (a reward stage dir, model dir, alias or hub id) or `--program`."""
    import torch

    from rlhf import artifacts, engine, models
    from rlhf.programs import Program, load_program

    if (model is None) == (program is None):
        raise ConfigError("rlhf serve: give one of --model (a reward model) or --program (module:function)")
    if program is not None:
        return ProgramScorer(Program(program, load_program(program, "--program"), "--program")), program
    run_device = engine.usable_device(device, "--device")
    final = artifacts.final_of_stage_dir(model, needed_by="rlhf serve")
    path = str(final) if final is not None else models.resolve_model(model)
    if dtype == "auto":
        dtype = "bfloat16" if run_device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    tokenizer = models.load_tokenizer(path)
    reward = models.load_scalar_model(path, tokenizer=tokenizer, require_head=True, dtype=dtype)
    scorer = ModelScorer(reward.to(run_device).eval(), tokenizer, batch_size=max_batch, max_length=max_length,
                         stats=models.load_reward_stats(path))
    return scorer, model


def bound_socket(host: str, port: int):
    """A socket bound to host:port for uvicorn to listen on; ConfigError naming them when it cannot be."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot bind ({err.strerror or err}); pick another --port, "
                          "or stop what listens there") from None
    return sock


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """(uvicorn server, port): `app` served from a daemon thread of this process, on `port` (0: a free one),
    returned once it accepts connections; `server.should_exit = True` stops it (tests and benchmarks)."""
    import threading

    import uvicorn

    sock = bound_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.01)
    return server, sock.getsockname()[1]


def serve(model: str | None = None, program: str | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, max_batch: int = 64, max_wait_ms: float = 2.0, device: str = "auto",
          dtype: str = "auto", max_length: int = 1024, max_body_mb: float = 8.0, max_queue: int = 4096) -> int:
    """`rlhf serve`: load, then serve until Ctrl-C or SIGTERM (requests in flight are answered first)."""
    import uvicorn

    check_bind(host, token)
    if max_batch < 1 or max_length < 1 or max_queue < 1 or max_body_mb <= 0 or max_wait_ms < 0:
        raise ConfigError("rlhf serve: --max-batch, --max-length and --max-queue must be >= 1, --max-body-mb > 0, "
                          "--max-wait-ms >= 0")
    sock = bound_socket(host, port)  # before loading: a port in use is known at once
    scorer, name = load_scorer(model, program, device=device, dtype=dtype, max_batch=max_batch,
                               max_length=max_length)
    app = build_app(scorer, name=name, max_batch=max_batch, max_wait_s=max_wait_ms / 1000, token=token,
                    max_body_bytes=int(max_body_mb * (1 << 20)), max_queue=max_queue)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    log.info("serving %s (%s) on http://%s:%d%s", name, scorer.kind, host, port, " (token required)" if token else "")
    # uvicorn catches SIGINT/SIGTERM while it serves and re-raises the signal once it has drained; quiet
    # handlers underneath make that re-raise a plain return, so a drained stop exits 0.
    before = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    log.info("stopped serving %s", name)
    return 0
