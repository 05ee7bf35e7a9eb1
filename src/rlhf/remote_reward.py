"""A reward model behind HTTP, scored like a program reward: `rlhf serve`, or OpenRLHF's `serve_rm`.

A `ppo.rewards` source `{url: http://host:port, token_env: NAME}` is a `RemoteScorer`. Each rank posts its
own rows (the server knows nothing of ranks) and gets one float per response back:

- `protocol: rlhf` posts `{"prompts", "responses", "fields"}` to `/score` (the server renders each pair
  with its reward model's chat template) and reads `{"scores"}`;
- `protocol: openrlhf` renders each pair itself with the policy's chat template (prompt for generation +
  response + EOS, as text) and posts `{"query"}` to `/get_reward`, reading `{"rewards"}`.

A connection error, a timeout (`timeout_s`) or a 5xx answer is retried `retries` times with doubling
waits; then, like a wrong number of scores or a NaN/inf score, it is a `RemoteRewardError`: one line naming
the URL and the last error. The stage stops on it as on any `TrainingError`, keeping its last checkpoint.
Only the standard library is used, so training needs no HTTP package.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from rlhf.errors import ConfigError, TrainingError

PROTOCOLS = ("rlhf", "openrlhf")
PATHS = {"rlhf": "/score", "openrlhf": "/get_reward"}
ANSWER_KEYS = {"rlhf": "scores", "openrlhf": "rewards"}


class RemoteRewardError(TrainingError):
    """The reward server cannot be used: unreachable after the retries, or an answer that is not one finite
    score per response. `status`: the HTTP status of its last answer, None when there was none; `reason`: the
    last error alone."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.status, self.reason = status, reason


def read_token(token_env: str | None, key: str = "ppo.rewards") -> str | None:
    """The bearer token from the environment variable `token_env` (None without one); ConfigError naming
    `key` when the variable is named but not set."""
    if not token_env:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise ConfigError(f"{key}: token_env names {token_env}, which is not set; export {token_env} with the "
                          "token the server was started with (rlhf serve --token, or its RLHF_SERVE_TOKEN)")
    return token


def render_text(tokenizer) -> Callable[[list, str], str]:
    """Pair -> text for OpenRLHF's `/get_reward`: the prompt rendered for generation by `tokenizer`'s chat
    template, the response, and the EOS token, as `rlhf.encoding` builds the ids the reward stage trains on."""

    def render(prompt, response: str) -> str:
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        return text + response + (tokenizer.eos_token or "")

    return render


class RemoteScorer:
    """One float per response from the reward server at `url` (see the module docstring)."""

    def __init__(self, url: str, *, token_env: str | None = None, timeout_s: float = 30.0, retries: int = 3,
                 protocol: str = "rlhf", render: Callable[[list, str], str] | None = None,
                 key: str = "ppo.rewards", backoff_s: float = 0.5):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"{key}: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.spec = url  # as configured: the source's name in the scores (`RewardSourceCfg.name`)
        self.url, self.timeout_s, self.retries, self.protocol = url.rstrip("/"), timeout_s, retries, protocol
        self.render, self.key, self.backoff_s = render, key, backoff_s
        self.token = read_token(token_env, key)
        self.stats: dict | None = None  # {"mean", "std"}: scores are returned standardised by them when set

    def __call__(self, rows: Sequence[dict], responses: Sequence[str]) -> list[float]:
        """`rows` are the prompt rows (internal schema: `prompt`, `fields`) the responses answer, one each."""
        if self.protocol == "rlhf":
            body = {"prompts": [row["prompt"] for row in rows], "responses": list(responses),
                    "fields": [row.get("fields", {}) for row in rows]}
        elif self.render is None:
            raise ConfigError(f"{self.key}: protocol openrlhf needs a chat template to render each pair as text")
        else:
            body = {"query": [self.render(row["prompt"], text) for row, text in zip(rows, responses, strict=True)]}
        values = self._values(self._request(PATHS[self.protocol], body), len(responses))
        if self.stats is None:
            return values
        mean, std = float(self.stats["mean"]), max(float(self.stats["std"]), 1e-6)
        return [(v - mean) / std for v in values]

    def health(self) -> dict:
        """`GET /health` once (no retries): the server's description; RemoteRewardError when it does not answer.
        OpenRLHF's server has no /health: under `protocol: openrlhf` any HTTP answer ({} for an error status)
        shows that it is up."""
        try:
            return self._request("/health", None, tries=1)
        except RemoteRewardError as err:
            if self.protocol == "openrlhf" and err.status is not None and err.status != 401:
                return {}
            raise

    def _values(self, answer, n: int) -> list[float]:
        name = ANSWER_KEYS[self.protocol]
        values = answer.get(name) if isinstance(answer, dict) else None
        if not isinstance(values, list):
            raise RemoteRewardError(f"{self.key}: {self.url} answered without a `{name}` list; check that it is "
                                    f"a reward server speaking protocol {self.protocol}")
        if len(values) != n:
            raise RemoteRewardError(f"{self.key}: {self.url} returned {len(values)} scores for {n} responses; "
                                    "it must return one per response")
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RemoteRewardError(f"{self.key}: {self.url} returned {value!r} as the score of response {i}; "
                                        "every score must be a finite number")
        return [float(v) for v in values]

    def _request(self, path: str, body: dict | None, tries: int | None = None):
        """The decoded JSON answer, retrying what may pass (no answer, a timeout, a 5xx); a 4xx is final."""
        tries = self.retries + 1 if tries is None else tries
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last, status = "no attempt", None
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                             method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                last, status = f"HTTP {err.code}: {_reason(err)}", err.code
                if err.code < 500:
                    break
            except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
                last, status = str(getattr(err, "reason", err)) or type(err).__name__, None
            except ValueError as err:  # the answer is not JSON
                last, status = f"the answer is not JSON ({err})", None
                break
        tried = f"after {tries} tries" if tries > 1 else "on the first try"
        raise RemoteRewardError(f"{self.key}: reward server {self.url}{path} failed {tried}: {last}; start or fix the "
                                "server, then re-run the command to resume from the last checkpoint", status, last)


def _reason(err: urllib.error.HTTPError) -> str:
    """The server's one-line reason (`rlhf serve` answers `{"detail": ...}`), else the status text."""
    try:
        detail = json.loads(err.read()).get("detail")
    except (ValueError, AttributeError, OSError):
        detail = None
    return str(detail or err.reason).splitlines()[0]
