"""Scored pairs per second of a served reward model (`rlhf serve`) against in-process scoring of the same pairs.

    python bench/serve_reward.py                          # tiny and SmolLM2-135M-shaped reward models
    python bench/serve_reward.py --model tiny --pairs 256 --rounds 3

For each model: the pairs scored in this process by `rlhf.scoring.score` (batches of `--max-batch`), then
the same pairs posted to `/score` of an `rlhf serve` process on loopback by 1, 4 and 16 concurrent clients,
each client sending its share in requests of `--request-size` pairs (the server batches across clients up
to `--max-batch`). It prints pairs/s for each, the largest score difference from in-process scoring, and
last the overhead of going over HTTP at PPO's batch size: one request of `--ppo-batch` pairs against
scoring them in process. Each round runs every measurement once, alternating in-process and served, so a
machine busy with other work slows both alike; the figures are medians over `--rounds` rounds.

Models are random-init (nothing is downloaded): `tiny` is the tests' 2-layer model; `135m` has
SmolLM2-135M's shape (576 hidden, 30 layers, 9/3 heads, 1536 intermediate, 49152-row embedding) with the
tiny BPE tokenizer, so sequences are as long as the tiny model's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

WORDS = ("the cat sat on a mat while rain fell over quiet hills and rivers ran to the sea under grey skies "
         "people walked home slowly talking about bread music numbers gardens and old friends").split()


def build(shape: str, out: Path) -> Path:
    """A random reward model dir of `shape` (tiny or 135m), with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf.tiny import build_tiny_reward

    path = build_tiny_reward(out / "tiny")
    if shape == "tiny":
        return path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, num_labels=1)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg)
    model.save_pretrained(out / "135m")
    tok.save_pretrained(out / "135m")
    return out / "135m"


def make_pairs(n: int, seed: int = 0) -> tuple[list, list[str]]:
    rng = random.Random(seed)
    prompts = [[{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(6, 12))) + "?"}]
               for _ in range(n)]
    responses = [" ".join(rng.choices(WORDS, k=rng.randint(10, 20))) + "." for _ in range(n)]
    return prompts, responses


def post(url: str, prompts, responses) -> list[float]:
    body = json.dumps({"prompts": prompts, "responses": responses}).encode()
    request = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.loads(answer.read())["scores"]


def served_pass(url: str, prompts, responses, clients: int, request_size: int) -> tuple[float, list[float]]:
    """(seconds, scores in pair order) for `clients` threads posting their shares in requests."""
    chunks = [(i, prompts[i:i + request_size], responses[i:i + request_size])
              for i in range(0, len(prompts), request_size)]
    scores: list[float] = [0.0] * len(prompts)

    def client(mine):
        for start, p, r in mine:
            scores[start:start + len(r)] = post(url, p, r)

    shares = [chunks[c::clients] for c in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, shares))
    return time.perf_counter() - start, scores


def start_server(path: Path, max_batch: int, threads: int, max_wait_ms: float) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads, as this process uses
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "serve", "--model", str(path), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--device", "cpu"],
                            stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"{url}: the server did not start")


def bench(shape: str, args, work: Path) -> None:
    from rlhf import models, scoring

    path = build(shape, work)
    tok = models.load_tokenizer(str(path))
    model = models.load_scalar_model(str(path), tokenizer=tok, require_head=True).eval()
    prompts, responses = make_pairs(args.pairs)
    batch = (prompts[:args.ppo_batch], responses[:args.ppo_batch])

    def in_process(p, r) -> tuple[float, list[float]]:
        start = time.perf_counter()
        scores = scoring.score(model, tok, p, r, batch_size=args.max_batch)
        return time.perf_counter() - start, scores

    proc, url = start_server(path, args.max_batch, torch.get_num_threads(), args.max_wait_ms)
    times: dict[str, list[float]] = {}
    try:
        in_process(prompts[:2], responses[:2]), post(url, prompts[:2], responses[:2])  # warm-up
        for _ in range(args.rounds):
            seconds, local = in_process(prompts, responses)
            times.setdefault("in-process", []).append(seconds)
            for clients in (1, 4, 16):
                seconds, served = served_pass(url, prompts, responses, clients, args.request_size)
                times.setdefault(clients, []).append(seconds)
                diff = max(abs(a - b) for a, b in zip(served, local, strict=True))
                times.setdefault("diff", []).append(diff)
            times.setdefault("batch in-process", []).append(in_process(*batch)[0])
            start = time.perf_counter()
            post(url, *batch)
            times.setdefault("batch http", []).append(time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait()
    rate = {key: args.pairs / statistics.median(times[key]) for key in ("in-process", 1, 4, 16)}
    print(f"[{shape}] in-process: {rate['in-process']:8.1f} pairs/s ({args.pairs} pairs, batches of {args.max_batch})")
    for clients in (1, 4, 16):
        print(f"[{shape}] served, {clients:2d} client(s): {rate[clients]:8.1f} pairs/s "
              f"({rate[clients] / rate['in-process']:.2f}x in-process)")
    print(f"[{shape}] largest |served - in-process| score: {max(times['diff']):.1e}")
    h, i = (statistics.median(times[key]) * 1000 for key in ("batch http", "batch in-process"))
    print(f"[{shape}] PPO batch of {args.ppo_batch}: over HTTP {h:.1f} ms, in process {i:.1f} ms, overhead "
          f"{h - i:+.1f} ms ({(h - i) / i:+.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "135m", "both"), default="both")
    parser.add_argument("--pairs", type=int, default=64, help="pairs per pass")
    parser.add_argument("--request-size", type=int, default=4, help="pairs per request")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch and the in-process batch")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the server's --max-wait-ms")
    parser.add_argument("--ppo-batch", type=int, default=16, help="pairs of the overhead measurement's one request")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads here and in the server (1 on a machine busy with other work: spinning "
                        "OpenMP threads that wait for a core slow a small model's forward many times over)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32; server: rlhf serve on loopback")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in ("tiny", "135m") if args.model == "both" else (args.model,):
            bench(shape, args, Path(tmp) / shape)


if __name__ == "__main__":
    main()
