#!/usr/bin/env python
"""PPO throughput: rlhf's own PPO loop against TRL 1.12.0's PPOTrainer, on the same inputs.

    python bench/ppo_throughput.py --model tiny|smollm2 [--rounds 3] [--steps 4] [--batch 8]
        [--response-length 32] [--ppo-epochs 2] [--mini-batches 1] [--micro-batch B]
    python bench/ppo_throughput.py --device cuda --model 0.8b|1.7b [--peer-site DIR]   # on a GPU
    python bench/ppo_throughput.py --advantage rloo|grpo|dr_grpo|reinforce_baseline [--samples-per-prompt 4] ...

On a GPU, `--model 0.8b` or `1.7b` builds random-init Llamas of those shapes (0.8b: hidden 2048, 16 layers,
32/8 heads, intermediate 5632; 1.7b: SmolLM2-1.7B's shape; both vocab 49152, tied) with a word-level
tokenizer of the same vocabulary, so nothing is downloaded; the defaults become bf16, batch 64, response
128, 2 PPO epochs x 2 minibatches, micro-batch 16. Each side also reports peak GPU memory and the share of
the step spent generating; ours the model FLOP utilisation of its update (6 x trained params x tokens for
actor and critic, over the update's time, against the bf16 matmul rate measured in the same run).
`--peer-site DIR` runs TRL 1.12 from a `pip install --no-deps --target DIR trl==1.12.0` dir with this
python (for machines without network), instead of creating its virtualenv.

What both sides get (built once per model under runs/bench_ppo/<model>/ and reused):
- the same policy dir (weights + the tokenizer exactly as rlhf loads it: pad <|endoftext|> != eos);
  the frozen reference is a second copy of it on both sides;
- the same 1-label reward model dir (tiny: `build_tiny_reward`; smollm2: SmolLM2 backbone with a seeded
  random `score` head); the critic is initialised from it on both sides;
- the same prompt token ids: rendered by `rlhf.encoding.prompt_ids` (chat template + generation prompt)
  and all of one length, so every left-padded batch has the same shape P on both sides;
- the same response length R on every row: neither side stops at EOS (TRL: `stop_token=None`; ours:
  `min_new_tokens = max_new_tokens` in the sampling config), checked on every rollout;
- the same batch per update, PPO epochs, minibatches and micro-batch; fp32, no eval generations, no
  checkpoints inside the timed steps.

Each implementation runs in its own subprocess (ours with this venv's python, TRL with a virtualenv of its
own at bench/.venv-trl112, created on first use), alternating ours/TRL for --rounds rounds. A driver times
the PPO iterations only (the interval between consecutive step-end callbacks; step 1 is warm-up and is
excluded, as is loading). The last line is `ratio ours/trl: X.XX` (median ours / median TRL samples/s).

`--advantage A` (a critic-free `ppo.advantage`) runs no TRL: it alternates two runs of ours on the same rows
per step, GAE (rollout_batch_size = batch, one response per prompt: actor, critic, reference, reward model)
and A (rollout_batch_size = batch / k, samples_per_prompt = k = `--samples-per-prompt`: no critic), and
prints each one's samples/s (responses per second) and peak memory (peak allocated on CUDA, the driver
process's peak RSS on CPU, loading included), then `mem ratio A/gae: X.XX` and last
`ratio A/gae samples/s: X.XX`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEER_VENV = BENCH / ".venv-trl112"
PEER_PINS = ["torch==2.13.0", "trl==1.12.0", "transformers==5.23.0", "accelerate==1.15.0", "datasets==5.2.0"]
OURS_PY = Path(sys.executable)
SEED = 1234
SHAPES = {  # hidden, layers, heads, kv heads, intermediate; vocab 49152, tied embeddings
    "0.8b": (2048, 16, 32, 8, 5632),
    "1.7b": (2048, 24, 32, 32, 8192),
}
SHAPE_VOCAB = 49152
CRITIC_FREE = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")
GPU_DEFAULTS = {"batch": 64, "response_length": 128, "ppo_epochs": 2, "mini_batches": 2, "micro_batch": 16}

_ADJ = ("bright", "heavy", "gentle", "strange", "ancient", "modern", "fragile", "golden", "hollow", "narrow",
        "polite", "rapid", "silent", "tiny", "enormous", "careful", "honest", "clever")
_NOUN = ("apple", "banana", "cherry", "dolphin", "elephant", "falcon", "guitar", "harbour", "island", "jacket",
         "kettle", "lantern", "meadow", "notebook", "orchestra", "pepper", "rabbit", "saddle", "tomato", "violin",
         "window", "zebra", "anchor", "blanket", "candle", "desert", "engine", "forest", "glacier", "hammer")
_TASK = ("Write a short story about", "Describe", "Explain how to draw", "Give three facts about",
         "Write a poem about", "Tell me a joke about")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ peer venv


def ensure_peer_venv() -> Path:
    """bench/.venv-trl112 with TRL 1.12.0 (the last release with PPOTrainer); created once, then reused."""
    py = PEER_VENV / "bin" / "python"
    marker = PEER_VENV / ".bench-ok"
    if marker.is_file() and marker.read_text() == "\n".join(PEER_PINS) and py.exists():
        return py
    log(f"creating {PEER_VENV} ({', '.join(PEER_PINS)}) ...")
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PINS], check=True)
    check = "import trl, transformers, torch; from trl.experimental.ppo import PPOTrainer; print(trl.__version__)"
    out = subprocess.run([str(py), "-c", check], check=True, capture_output=True, text=True).stdout.strip()
    if out != "1.12.0":
        raise SystemExit(f"{PEER_VENV}: expected trl 1.12.0, got {out}")
    marker.write_text("\n".join(PEER_PINS))
    return py


# ------------------------------------------------------------------------------------------ shared inputs


def _prompts(tokenizer, n: int) -> tuple[list[dict], list[list[int]]]:
    """n chat prompts whose rendered ids (chat template + generation prompt) all have the same length."""
    from collections import defaultdict

    from rlhf import encoding

    by_len: dict[int, list] = defaultdict(list)
    for task in _TASK:
        for adj in _ADJ:
            for noun in _NOUN:
                messages = [{"role": "user", "content": f"{task} the {adj} {noun}."}]
                ids = encoding.prompt_ids(tokenizer, messages)
                by_len[len(ids)].append((messages, ids))
    length, rows = max(by_len.items(), key=lambda kv: len(kv[1]))
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} prompts of length {length}; lower --steps or --batch")
    return [{"prompt": m} for m, _ in rows[:n]], [ids for _, ids in rows[:n]]


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` ids (ChatML specials, the template's role words, then
    w3 w4 ...), for random-init models of real vocabulary sizes without downloading a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf.models import CHATML_PATH
    from rlhf.tiny import BOS, EOS, PAD

    words = [PAD, BOS, EOS, "user", "assistant", "system"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD)
    tok.chat_template = CHATML_PATH.read_text(encoding="utf-8")
    return tok


def build_shape(shape: str, out: Path, tok, *, reward: bool, dtype, device: str):
    """A random-init Llama of `shape` (seeded), saved with `tok`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    hidden, layers, heads, kv, inter = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=SHAPE_VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **({"num_labels": 1} if reward else {}))
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(SEED + int(reward))
        model = (LlamaForSequenceClassification if reward else LlamaForCausalLM)(cfg).to(dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model


def _shape_prompts(n: int) -> list[list[dict]]:
    """n one-turn prompts of 24 distinct words each (all the same length in tokens)."""
    import random

    rng = random.Random(SEED)
    return [[{"role": "user", "content": " ".join(f"w{rng.randrange(6, SHAPE_VOCAB)}" for _ in range(24))}]
            for _ in range(n)]


def _ready(work: Path, n_prompts: int) -> bool:
    done = work / ".ready"
    return done.is_file() and json.loads(done.read_text()).get("n_prompts", 0) >= n_prompts


def prepare_shape(work: Path, model: str, n_prompts: int, device: str, dtype: str) -> Path:
    """runs/bench_ppo/<shape>/: random-init policy and reward model of the shape, word-level prompts."""
    import torch

    from rlhf import encoding, models

    if _ready(work, n_prompts):
        return work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    tok = word_tokenizer(SHAPE_VOCAB)
    for name, reward in (("policy", False), ("reward", True)):
        build_shape(model, work / name, tok, reward=reward, dtype=getattr(torch, dtype), device=device)
    tok = models.load_tokenizer(str(work / "policy"), padding_side="left")
    prompts = _shape_prompts(n_prompts)
    ids = [encoding.prompt_ids(tok, p) for p in prompts]
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts),
                                        encoding="utf-8")
    (work / "prompt_ids.json").write_text(json.dumps(ids), encoding="utf-8")
    (work / ".ready").write_text(json.dumps({"n_prompts": n_prompts, "prompt_len": len(ids[0])}))
    log(f"prepared {work} in {time.perf_counter() - t0:.1f}s (prompt length {len(ids[0])})")
    return work


def prepare(model: str, n_prompts: int, device: str = "cpu", dtype: str = "float32") -> Path:
    """runs/bench_ppo/<model>/{policy,reward,prompts.jsonl,prompt_ids.json}; reused when present."""
    import torch

    from rlhf import models

    work = ROOT / "runs" / "bench_ppo" / model
    if model in SHAPES:
        return prepare_shape(work, model, n_prompts, device, dtype)
    done = work / ".ready"
    if done.is_file() and json.loads(done.read_text()).get("n_prompts", 0) >= n_prompts:
        return work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    if model == "tiny":
        from rlhf.tiny import build_tiny, build_tiny_reward

        src_policy = build_tiny(work / "src_policy", seed=0)
        src_reward = build_tiny_reward(work / "src_reward", seed=1)
    else:
        src_policy, src_reward = Path(models.resolve_model("smollm2-135m-instruct")), None
    tok = models.load_tokenizer(str(src_policy), padding_side="left")
    policy = models.load_causal_lm(str(src_policy), tokenizer=tok, dtype="float32")
    models.save_pretrained_atomic(policy, tok, work / "policy")
    if src_reward is None:  # SmolLM2 backbone + seeded random 1-label head: same weights for both sides
        from transformers import AutoModelForSequenceClassification

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            reward = AutoModelForSequenceClassification.from_pretrained(str(work / "policy"), num_labels=1,
                                                                        dtype=torch.float32)
        reward.config.pad_token_id = tok.pad_token_id
    else:
        reward = models.load_scalar_model(str(src_reward), tokenizer=tok, require_head=True, dtype="float32")
    models.save_pretrained_atomic(reward, tok, work / "reward")
    for d in ("src_policy", "src_reward"):
        shutil.rmtree(work / d, ignore_errors=True)
    rows, ids = _prompts(tok, n_prompts)
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (work / "prompt_ids.json").write_text(json.dumps(ids), encoding="utf-8")
    done.write_text(json.dumps({"n_prompts": n_prompts, "prompt_len": len(ids[0])}))
    log(f"prepared {work} in {time.perf_counter() - t0:.1f}s (prompt length {len(ids[0])})")
    return work


# ------------------------------------------------------------------------------------------ runs


def run_driver(which: str, python: Path, work: Path, args, round_no: int) -> dict:
    """One driver subprocess. `which`: "ours", "trl", or an advantage estimator of ours ("gae", "rloo", ...,
    the critic-free ones with `--samples-per-prompt` responses per prompt)."""
    out = work / f"result-{which}-{round_no}.json"
    out.unlink(missing_ok=True)
    ours = which != "trl"
    script = BENCH / ("ppo_driver_ours.py" if ours else "ppo_driver_trl.py")
    cmd = [str(python), str(script), "--work", str(work), "--out", str(out), "--steps", str(args.steps),
           "--batch", str(args.batch), "--response-length", str(args.response_length),
           "--ppo-epochs", str(args.ppo_epochs), "--mini-batches", str(args.mini_batches),
           "--micro-batch", str(args.micro_batch), "--seed", str(SEED + round_no),
           "--device", args.device, "--dtype", args.dtype]
    if ours:
        cmd += ["--generation", args.generation]
    if which in CRITIC_FREE:
        cmd += ["--advantage", which, "--samples-per-prompt", str(args.samples_per_prompt)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    if ours:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    elif args.peer_site:  # TRL 1.12 ahead of this environment's own trl; everything else shared
        env["PYTHONPATH"] = os.pathsep.join(p for p in (args.peer_site, env.get("PYTHONPATH")) if p)
    else:
        env.pop("PYTHONPATH", None)
        env.pop("VIRTUAL_ENV", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(work), capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{which} driver failed (rc {proc.returncode})")
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def summarize(res: dict, batch: int) -> tuple[float, float]:
    """(samples/s, response tokens/s) over the timed steps (all but the first)."""
    times = res["step_times"][1:]
    total = sum(times)
    return batch * len(times) / total, sum(res["response_tokens"][1:]) / total


def matmul_rate(device: str, dtype: str) -> float:
    """FLOP/s of a large square matmul in `dtype` on `device` (the peak the update's utilisation is read
    against)."""
    import torch

    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - start)


def extra_figures(res: dict, peak_rate: float | None) -> str:
    """Peak GPU memory, share of the step spent generating and (ours) the update's FLOP utilisation."""
    parts = []
    if res.get("peak_bytes"):
        parts.append(f"peak {res['peak_bytes'] / 2**30:.1f} GiB")
    gen, steps = res.get("generate_times"), res["step_times"]
    if gen:
        parts.append(f"generating {sum(gen[1:]) / sum(steps[1:]):.0%} of the step")
    if res.get("update_flops") and res.get("update_times") and peak_rate:
        rate = sum(res["update_flops"][1:]) / sum(res["update_times"][1:])
        parts.append(f"update {rate / 1e12:.0f} TFLOP/s = {rate / peak_rate:.0%} MFU")
    return ", ".join(parts)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2", *SHAPES], default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="PPO iterations per run; the first is warm-up")
    p.add_argument("--batch", type=int, default=None, help="rollout rows (responses) per PPO iteration (8; GPU 64); "
                   "with --advantage the critic-free run samples batch / --samples-per-prompt prompts")
    p.add_argument("--response-length", type=int, default=None, help="32; GPU 128")
    p.add_argument("--ppo-epochs", type=int, default=None, help="2")
    p.add_argument("--mini-batches", type=int, default=None, help="1; GPU 2")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward/backward (the minibatch; GPU 16)")
    p.add_argument("--generation", default="auto", help="our ppo.generation: auto, hf, static or graph")
    p.add_argument("--peer-site", default=None, help="a --target dir holding trl 1.12.0 (no virtualenv is made)")
    p.add_argument("--advantage", choices=CRITIC_FREE, default=None,
                   help="compare ours with this critic-free ppo.advantage against ours with GAE (no TRL run)")
    p.add_argument("--samples-per-prompt", type=int, default=4,
                   help="with --advantage: responses per prompt (ppo.samples_per_prompt); must divide --batch")
    args = p.parse_args()
    cpu_defaults = {"batch": 8, "response_length": 32, "ppo_epochs": 2, "mini_batches": 1, "micro_batch": 0}
    for key, value in (GPU_DEFAULTS if args.device == "cuda" else cpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.model in SHAPES and args.device != "cuda":
        p.error(f"--model {args.model} is a GPU benchmark: add --device cuda")
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is warm-up)")
    if args.advantage and (args.samples_per_prompt < 2 or args.batch % args.samples_per_prompt):
        p.error("--samples-per-prompt must be >= 2 and divide --batch (rows per step on both sides)")
    if args.batch % args.mini_batches:
        p.error("--mini-batches must divide --batch")
    mini = args.batch // args.mini_batches
    args.micro_batch = args.micro_batch or mini
    if mini % args.micro_batch:
        p.error("--micro-batch must divide the minibatch (batch / mini-batches)")
    return args


def report(args, work: Path, rows: list, peak_rate: float | None) -> None:
    """The settings, every round, the medians with the extra figures, and `ratio ours/trl` last."""
    prompt_len = json.loads((work / ".ready").read_text())["prompt_len"]
    info = {w: next(x[4] for x in rows if x[1] == w) for w in ("ours", "trl")}
    print(f"PPO throughput, model={args.model} device={args.device} dtype={args.dtype} prompt_len={prompt_len} "
          f"response_length={args.response_length} "
          f"batch={args.batch} ppo_epochs={args.ppo_epochs} mini_batches={args.mini_batches} "
          f"micro_batch={args.micro_batch} steps={args.steps} (first excluded) rounds={args.rounds}")
    for w in ("ours", "trl"):
        print(f"  {w}: {info[w]['impl']}, torch threads {info[w]['threads']}, "
              f"optimizer steps per rollout {info[w]['optimizer_steps_per_rollout']}")
    print(f"{'round':>5} {'impl':>5} {'samples/s':>10} {'tokens/s':>10}")
    for r, which, sps, tps, _ in rows:
        print(f"{r + 1:>5} {which:>5} {sps:>10.3f} {tps:>10.1f}")
    med = {w: (statistics.median(x[2] for x in rows if x[1] == w), statistics.median(x[3] for x in rows if x[1] == w))
           for w in ("ours", "trl")}
    if peak_rate:
        print(f"bf16 matmul rate measured here: {peak_rate / 1e12:.0f} TFLOP/s")
    for w in ("ours", "trl"):
        figures = extra_figures([x[4] for x in rows if x[1] == w][-1], peak_rate)
        print(f"median {w:>4}: {med[w][0]:.3f} samples/s, {med[w][1]:.1f} tokens/s" + (f" ({figures})" if figures else ""))
    print(f"ratio ours/trl: {med['ours'][0] / med['trl'][0]:.2f}")


def peak_memory(res: dict) -> int:
    """Peak allocated GPU memory where the run had one, else the driver process's peak RSS."""
    return res.get("peak_bytes") or res.get("peak_rss_bytes", 0)


def report_advantage(args, work: Path, rows: list, peak_rate: float | None) -> None:
    """--advantage: the settings, every round, the medians, `mem ratio` and `ratio <advantage>/gae` last."""
    prompt_len = json.loads((work / ".ready").read_text())["prompt_len"]
    adv, k = args.advantage, args.samples_per_prompt
    mem_kind = "peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"PPO throughput, ours: {adv} vs gae, model={args.model} device={args.device} dtype={args.dtype} "
          f"prompt_len={prompt_len} response_length={args.response_length} rows per step={args.batch} "
          f"(gae: {args.batch} prompts x 1; {adv}: {args.batch // k} prompts x {k}) ppo_epochs={args.ppo_epochs} "
          f"mini_batches={args.mini_batches} micro_batch={args.micro_batch} steps={args.steps} (first excluded) "
          f"rounds={args.rounds}")
    print(f"{'round':>5} {'impl':>18} {'samples/s':>10} {'tokens/s':>10} {mem_kind + ' MiB':>16}")
    for r, which, sps, tps, res in rows:
        print(f"{r + 1:>5} {which:>18} {sps:>10.3f} {tps:>10.1f} {peak_memory(res) / 2**20:>16.0f}")
    med = {}
    for w in ("gae", adv):
        mine = [x for x in rows if x[1] == w]
        med[w] = (statistics.median(x[2] for x in mine), statistics.median(x[3] for x in mine),
                  statistics.median(peak_memory(x[4]) for x in mine))
        figures = extra_figures(mine[-1][4], peak_rate)
        print(f"median {w:>18}: {med[w][0]:.3f} samples/s, {med[w][1]:.1f} tokens/s, {mem_kind} "
              f"{med[w][2] / 2**20:.0f} MiB" + (f" ({figures})" if figures else ""))
    print(f"mem ratio {adv}/gae ({mem_kind}): {med[adv][2] / med['gae'][2]:.2f}")
    print(f"ratio {adv}/gae samples/s: {med[adv][0] / med['gae'][0]:.2f}")


def main() -> None:
    args = parse_args()
    if args.advantage:  # ours against ours: GAE and the critic-free estimator, no TRL
        pair = (("gae", OURS_PY), (args.advantage, OURS_PY))
    else:
        pair = (("ours", OURS_PY), ("trl", OURS_PY if args.peer_site else ensure_peer_venv()))
    work = prepare(args.model, n_prompts=args.batch * args.steps * 2, device=args.device, dtype=args.dtype)
    peak_rate = matmul_rate(args.device, args.dtype) if args.device == "cuda" else None
    rows = []
    for r in range(args.rounds):
        for which, py in pair if r % 2 == 0 else pair[::-1]:
            res = run_driver(which, py, work, args, r)
            sps, tps = summarize(res, args.batch)
            rows.append((r, which, sps, tps, res))
            log(f"round {r + 1}/{args.rounds} {which}: {sps:.3f} samples/s, {tps:.1f} tokens/s "
                f"(steps {[round(t, 3) for t in res['step_times']]}, wall {res['wall_s']:.0f}s)")
            figures = extra_figures(res, peak_rate)
            if figures:
                log(f"  {which}: {figures}")
    (report_advantage if args.advantage else report)(args, work, rows, peak_rate)


if __name__ == "__main__":
    main()
