"""Check f of scripts/gpu_check.sh: rollouts' three sampling paths draw the same greedy tokens over PPO steps.

    deepspeed --num_gpus 1 scripts/gpu_check_decode.py --config configs/tiny.yaml --set run.output_dir=DIR \
        --set ppo.generation=graph [--set key=value ...] [--json OUT]

Runs the PPO stage through `rlhf.stages.ppo.run`, under the launcher, from the SFT and reward models in
the run dir. After every PPO step (so after each update of the actor) it samples one batch of left-padded
prompts of mixed lengths greedily from the same actor weights three ways, as `ppo.generation` names them:
`hf` (transformers' generate), `static` (a fresh static-cache decoder, eager) and `graph` (the run's own
decoder, the one the rollouts use: its CUDA graph was captured before the update and is replayed or
captured again here). static must give hf's token ids and graph static's, to the last one; where a row
first differs, a near-tie of the reference (`compare_paths`) is listed instead of failed, and the row is not
compared past it. Each path is then timed on a second call: milliseconds per decode step (wall time /
tokens per row, prefill included), printed next to the weight-read bound (the actor's weight bytes / the
device's memory bandwidth: a measured copy, and the card's data-sheet figure where the card is known).

Prints one `step N:` line per step, the bound, and a last `measured: ...` line (or `FAIL: ...` lines); exit
status 1 when tokens differ, or on CUDA when the decode step was never captured as a graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from decode_speed import copy_bandwidth, sync  # noqa: E402  (the bench's weight-read bound, measured alike)

PATHS = ("hf", "static", "graph")
# Data-sheet memory bandwidth, bytes/s, by a fragment of torch.cuda.get_device_name (most specific first):
# H100 SXM5 80 GB HBM3 3.35 TB/s, H100 PCIe 2.0 TB/s, H100 NVL 3.9 TB/s, H200 (SXM and NVL) 4.8 TB/s.
SPEC_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H200", 4.8e12))


class CaptureCounter(logging.Handler):
    """Counts the library's own log lines about the graph: captures (the first at info, later ones at
    debug) and failed captures (a warning; decoding then goes on without the graph)."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.captured = self.failed = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.captured += "decode step captured as a CUDA graph" in message
        self.failed += "could not capture the decode step" in message


def mixed_prompts(rows: list[dict], n: int) -> list:
    """n prompts of mixed lengths: prompt i joins the texts of 1 to 4 consecutive rows, so the batch is
    left-padded by different amounts (each row's own prompt schema is kept: a string or a message list)."""
    def text(prompt) -> str:
        return prompt if isinstance(prompt, str) else prompt[-1]["content"]

    out = []
    for i in range(n):
        joined = " ".join(text(rows[(i + j) % len(rows)]["prompt"]) for j in range(1 + i % 4))
        first = rows[i % len(rows)]["prompt"]
        out.append(joined if isinstance(first, str) else [{"role": "user", "content": joined}])
    return out


def spec_bandwidth(device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((bw for key, bw in SPEC_BANDWIDTH if key in name), None)


def top2_at(module, ids, mask, row: int, tokens: list[int], pos: int) -> tuple[float, float, int, int]:
    """(top-1 logit, top-2 logit, their token ids) of the reference forward (the whole sequence, no cache)
    at response position `pos` of `row`, given the reference's own tokens before it."""
    prompt = ids[row][mask[row].bool()]
    seq = torch.cat([prompt, torch.tensor(tokens[:pos], dtype=prompt.dtype, device=prompt.device)])[None]
    with torch.no_grad():
        logits = module(input_ids=seq, use_cache=False).logits[0, -1].float()
    top = logits.topk(2)
    return float(top.values[0]), float(top.values[1]), int(top.indices[0]), int(top.indices[1])


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two responses differ (a length difference counts), or None."""
    if a == b:
        return None
    return next((j for j, (s, t) in enumerate(zip(a, b, strict=False)) if s != t), min(len(a), len(b)))


def compare_paths(module, ids, mask, ref: list[list[int]], other: list[list[int]],
                  name: str) -> tuple[list[str], list[str]]:
    """(failures, near-ties) of `other` against the reference tokens `ref`, row by row, token ids exactly.

    Where a row first differs, the reference forward's top-2 logit gap there decides: above a few roundings
    of the weights' dtype (4 * eps * |top-1 logit|: 3% in bf16) the paths disagree on a clear choice, a
    defect; within it, a near-tie, which two correct paths with other attention kernels (HF's growing cache,
    the static one) may break apart in bf16; that row is not compared past it.
    """
    eps = torch.finfo(next(module.parameters()).dtype).eps
    failures, ties = [], []
    for row, (a, b) in enumerate(zip(ref, other, strict=True)):
        j = first_difference(a, b)
        if j is None:
            continue
        top1, top2, t1, t2 = top2_at(module, ids, mask, row, a, j)
        what = (f"{name} at row {row} (prompt of {int(mask[row].sum())} tokens), token {j}: {a[j:j + 4]} vs "
                f"{b[j:j + 4]}; reference top-2 logits there {top1:.4f} (token {t1}) and {top2:.4f} "
                f"(token {t2}), gap {top1 - top2:.4f}")
        (ties if top1 - top2 <= 4 * eps * max(1.0, abs(top1)) else failures).append(what)
    return failures, ties


class Recorder:
    """The run's `on_step(ctx, stats)`: after each PPO step, greedy tokens and speed of every path."""

    def __init__(self):
        self.static = None  # the `static` path's decoder, made once (its cache is reused, as in a run)
        self.steps: list[dict] = []
        self.failures: list[str] = []

    def _sample(self, ctx, module, ids, mask, decoder):
        from rlhf import engine
        from rlhf.generation import Sampling, hf_config, sample

        config = hf_config(ctx.tokenizer, Sampling(greedy=True), ctx.cfg.ppo.max_new_tokens)
        synced = engine.world_size() > 1 and engine.is_zero3(ctx.actor)  # as the rollout calls it
        return sample(module, ctx.tokenizer, ids, mask, config, decoder=decoder, synced_gpus=synced)

    def __call__(self, ctx, stats) -> None:
        from rlhf import engine
        from rlhf.batching import encode_prompts
        from rlhf.stages.ppo.experience import make_decoder

        ppo = ctx.cfg.ppo
        if self.static is None:
            static = dataclasses.replace(ppo, generation="static")
            self.static = make_decoder(static, ctx.cfg.data.max_prompt_length)
        decoders = {"hf": None, "static": self.static, "graph": ctx.decoder}
        # As many rows as a rollout has, so the run's graph decoder keeps its buffers and graph (same shape).
        prompts = mixed_prompts(ctx.rows, ppo.rollout_batch_size)
        rec: dict = {"step": ctx.step, "ms_per_step": {}, "ties": []}
        tokens: dict[str, list[list[int]]] = {}
        ctx.actor.eval()
        with engine.gathered_for_generation(ctx.actor) as module:
            ids, mask = encode_prompts(ctx.tokenizer, prompts, ctx.cfg.data.max_prompt_length, ctx.device)
            rec["prompt_tokens"] = [int(n) for n in mask.sum(dim=1).tolist()]
            rec["weight_bytes"] = sum(p.numel() * p.element_size() for p in module.parameters())
            rec["dtype"] = str(next(module.parameters()).dtype).replace("torch.", "")
            for path in PATHS:
                tokens[path] = self._sample(ctx, module, ids, mask, decoders[path]).token_lists()
                sync(ctx.device)
                start = time.perf_counter()  # the second call: warm, and the graph (if any) captured
                again = self._sample(ctx, module, ids, mask, decoders[path])
                sync(ctx.device)
                rec["ms_per_step"][path] = (time.perf_counter() - start) * 1e3 / again.ids.shape[1]
                if again.token_lists() != tokens[path]:
                    self.failures.append(f"step {ctx.step}: {path} gave other tokens on a second call with "
                                         "the same weights")
            # graph against static: the same kernels, replayed, so a stale or broken graph shows here
            for ref, path in (("hf", "static"), ("static", "graph")):
                failed, ties = compare_paths(module, ids, mask, tokens[ref], tokens[path], f"{path} vs {ref}")
                self.failures += [f"step {ctx.step}: {line}" for line in failed]
                rec["ties"] += [f"step {ctx.step}: {line}" for line in ties]
        rec["tokens"] = tokens["hf"]
        if self.steps:  # rows whose greedy answer the update changed: what a graph on stale weights misses
            before = self.steps[-1]["tokens"]
            rec["changed_rows"] = sum(a != b for a, b in zip(before, rec["tokens"], strict=True))
        self.steps.append(rec)


def report(recorder: Recorder, counter: CaptureCounter, device, out: str | None) -> int:
    """Print the comparison and speed lines; 0 when every check held, else 1."""
    from rlhf import engine

    failures = list(recorder.failures)
    if not recorder.steps:
        failures.append("no PPO step ran (ppo.steps must be >= 1)")
    if device.type == "cuda" and (counter.failed or not counter.captured):
        failures.append(f"the decode step was not captured as a CUDA graph ({counter.captured} captures, "
                        f"{counter.failed} failed: see the warning above)")
    for line in failures:
        print(f"FAIL: {line}")
    if engine.rank() != 0 or not recorder.steps:
        return 1 if failures else 0
    for rec in recorder.steps:
        lengths = rec["prompt_tokens"]
        changed = f", the update changed {rec['changed_rows']} of them" if "changed_rows" in rec else ""
        speeds = ", ".join(f"{p} {rec['ms_per_step'][p]:.2f}" for p in PATHS)
        print(f"step {rec['step']}: {len(lengths)} greedy rows, prompts of {min(lengths)}-{max(lengths)} "
              f"tokens (left-padded), {sum(len(t) for t in rec['tokens'])} response tokens{changed}; "
              f"ms/decode step {speeds}")
        for line in rec["ties"]:
            print(f"  near-tie (not compared past it): {line}")
    last = recorder.steps[-1]
    bandwidth = copy_bandwidth(device)
    name, spec = spec_bandwidth(device)
    weights = last["weight_bytes"]
    bound = weights / bandwidth * 1e3
    sheet = f"; at the data sheet's {spec / 1e12:.2f} TB/s for {name}: {weights / spec * 1e3:.4f} ms" \
        if spec else ""
    print(f"weight-read bound: {bound:.4f} ms/decode step ({weights / 2**20:.2f} MiB of {last['dtype']} "
          f"weights / measured copy bandwidth {bandwidth / 1e12:.3f} TB/s{sheet})")
    print(f"CUDA graph captures logged: {counter.captured} (rollouts and these calls), "
          f"failed: {counter.failed}")
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump({"steps": recorder.steps, "bandwidth": bandwidth, "spec_bandwidth": spec,
                       "device": name, "captures": counter.captured, "failures": failures}, fh)
    if not failures:
        ties = sum(len(rec["ties"]) for rec in recorder.steps)
        speeds = ", ".join(f"{p} {last['ms_per_step'][p]:.2f}" for p in PATHS)
        print(f"measured: greedy tokens equal (hf = static = graph) after each of {len(recorder.steps)} PPO "
              f"steps{f' ({ties} near-ties)' if ties else ''}; ms/decode step {speeds} vs weight-read bound "
              f"{bound:.4f}")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="write the per-step records here (main rank)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher's
    args = p.parse_args(argv)
    import os

    rank0 = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s rlhf %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:  # the counter hears rlhf's debug lines; the log does not
        handler.setLevel(logging.INFO if rank0 else logging.WARNING)
    counter = CaptureCounter()
    logging.getLogger("rlhf").addHandler(counter)
    logging.getLogger("rlhf").setLevel(logging.DEBUG)

    from rlhf import claims, engine, preflight, tracking
    from rlhf.config import load_config
    from rlhf.errors import RlhfError
    from rlhf.stages import ppo

    cfg = load_config(args.config, args.overrides)
    if cfg.ppo.generation != "graph":
        print("FAIL: run with --set ppo.generation=graph (the run's own decoder is the `graph` path)")
        return 2
    recorder, ok = Recorder(), False
    try:  # what `rlhf ppo` does (rlhf.stages.run_stage), with the callback
        preflight.check_or_raise(cfg, ["ppo"], standalone=True)
        engine.init_distributed()
        ppo.run(cfg, on_step=recorder)
        ok = True
    except RlhfError as err:
        print(f"FAIL: {err}")
        return err.exit_code or 1
    finally:
        tracking.close_open(ok=False)  # open only when the stage ended by an error
        claims.release_all()
        engine.cleanup(wait_for_others=ok)
    return report(recorder, counter, engine.device(cfg.run.device), args.json)


if __name__ == "__main__":
    sys.exit(main())
