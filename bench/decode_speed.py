"""Decode speed of rollout sampling: HF generate vs the static-cache decoder, eager and as a CUDA graph.

    python bench/decode_speed.py --device cuda --shape 0.8b        # the rollout of the GPU PPO benchmark
    python bench/decode_speed.py --device cpu --shape tiny --new 8  # a smoke run anywhere

A random-init Llama of the named shape (nothing is downloaded), `--batch` prompts of `--prompt` tokens,
exactly `--new` tokens each (no row stops early: no token is an EOS). For each path it prints ms per
decode step (wall time of the whole call / new tokens, prefill included), tokens/s and peak GPU memory,
then the weight-read bound: the bytes of the weights over the measured device copy bandwidth, the time a
decode step cannot beat when it is bound by memory. The last line is `ratio hf/graph: X` (or hf/static
where there is no GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (64, 2, 4, 2, 128, 1000),
    "135m": (576, 30, 9, 3, 1536, 49152),  # SmolLM2-135M
    "0.8b": (2048, 16, 32, 8, 5632, 49152),
    "1.7b": (2048, 24, 32, 32, 8192, 49152),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(shape: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync(device)
    return 2 * n * 5 / (time.perf_counter() - start)


def run_path(path: str, model, ids, mask, new: int, reps: int):
    """(seconds per call, peak bytes, capture seconds or None) of one sampling path."""
    from transformers import GenerationConfig

    from rlhf.generation import Sampling, StaticDecoder

    device = ids.device
    if path == "hf":
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                  min_new_tokens=new, eos_token_id=2, pad_token_id=0, use_cache=True)

        def call():
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
        decoder = None
    else:
        decoder = StaticDecoder(ids.shape[1] + new, use_graph=path == "graph")

        def call():
            return decoder.generate(model, ids, mask, max_new_tokens=new, sampling=Sampling(), eos_ids=[-1],
                                    pad_id=0)
    out = call()  # warm-up (and the graph's capture)
    assert out.shape[1] == new, f"{path}: {out.shape[1]} tokens, expected {new}"
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), peak, (decoder.capture_seconds if decoder is not None else None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.8b")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=38)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--paths", default=None, help="comma-separated among hf,static,graph (default: all that apply)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    paths = (args.paths.split(",") if args.paths else
             ["hf", "static", "graph"] if device.type == "cuda" else ["hf", "static"])
    model = build(args.shape, device, dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, SHAPES[args.shape][5], (args.batch, args.prompt), generator=gen).to(device)
    mask = torch.ones_like(ids)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    print(f"model {args.shape} ({sum(t.numel() for t in model.parameters()) / 1e6:.1f} M params, "
          f"{weight_bytes / 2**30:.2f} GiB {str(dtype).replace('torch.', '')}) on {device}; batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens")
    results = {}
    for path in paths:
        seconds, peak, capture = run_path(path, model, ids, mask, args.new, args.reps)
        results[path] = seconds
        extra = f", graph capture {capture:.2f} s (once)" if capture else ""
        print(f"{path:>7}: {seconds * 1e3 / args.new:8.2f} ms/step  {args.batch * args.new / seconds:10.0f} tokens/s"
              f"  peak {peak / 2**30:6.2f} GiB{extra}")
    bandwidth = copy_bandwidth(device)
    print(f"  bound: {weight_bytes / bandwidth * 1e3:8.3f} ms/step  (weights {weight_bytes / 2**30:.2f} GiB / "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s)")
    best = "graph" if "graph" in results else "static"
    if "hf" in results and best in results:
        print(f"ratio hf/{best}: {results['hf'] / results[best]:.2f}")


if __name__ == "__main__":
    main()
