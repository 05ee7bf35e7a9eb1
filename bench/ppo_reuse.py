#!/usr/bin/env python
"""What `ppo.reuse_rollout_forward` buys: PPO steps with it on and off, alternating within each run.

    python bench/ppo_reuse.py --model tiny|smollm2 [--runs 2] [--steps 9] [--batch 8]
        [--response-length 32] [--ppo-epochs 2] [--mini-batches 1] [--micro-batch 0] [--threads 2]

The inputs are those of `ppo_throughput.py` (`prepare`: runs/bench_ppo/<model>/), and each run is one
subprocess of our PPO stage set up as `ppo_driver_ours.py` sets it up (plain-torch engines, every response
exactly --response-length tokens). Within a run the setting flips after every step (run 1 starts on, run 2
off, ...), so on and off steps share the machine's load as it drifts; step 1 is warm-up and is left out.
Per mode it prints the median update phase (`perf/update_time`: the optimizer steps, which the reuse
shortens) and the median step (`perf/step_time`: rollout, experience and update; the experience phase pays
for the reuse by running the first micro-batch's actor and critic forwards with their graphs), in wall
seconds and in this process's CPU seconds (`time.process_time`, all its threads: the work done, which
other jobs on the machine change far less than the wall time; with `--threads 1` no thread spins waiting
for another), then `ratio off/on wall update: X.XX step: Y.YY  cpu update: ... step: ...` (above 1: the
reuse is faster).
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

from ppo_throughput import ROOT, SEED, prepare


def drive(args) -> None:
    """In the subprocess: one PPO run, the setting flipped after each step; writes the per-step times."""
    import torch
    from ppo_driver_ours import fix_response_length, make_config

    from rlhf.stages import ppo
    from rlhf.stages.ppo import loop

    torch.set_num_threads(args.threads)

    work = Path(args.work)
    run_dir = work / "reuse_run"
    args.generation, args.device, args.dtype = "auto", "cpu", "float32"
    cfg = make_config(args, work, run_dir)
    cfg.ppo.reuse_rollout_forward = bool(args.start_on)
    fix_response_length(work)
    rows, update_cpu, last = [], [], [time.process_time()]
    base_update = loop.ppo_update

    def timed_update(*a, **kw):
        start = time.process_time()
        out = base_update(*a, **kw)
        update_cpu.append(time.process_time() - start)
        return out

    def on_step(ctx, stats):
        now = time.process_time()
        rows.append({"reuse": ctx.cfg.ppo.reuse_rollout_forward, "update": stats["perf/update_time"],
                     "step": stats["perf/step_time"], "update_cpu": update_cpu[-1], "step_cpu": now - last[-1]})
        last.append(now)
        ctx.cfg.ppo.reuse_rollout_forward = not ctx.cfg.ppo.reuse_rollout_forward

    loop.ppo_update = timed_update
    ppo.run(cfg, on_step=on_step)
    Path(args.out).write_text(json.dumps(rows[1:]))  # step 1: warm-up
    shutil.rmtree(run_dir, ignore_errors=True)


def run_once(work: Path, args, start_on: bool, run_no: int) -> list[dict]:
    out = work / f"result-reuse-{run_no}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--drive", "--work", str(work), "--out", str(out), "--start-on", str(int(start_on)),
           "--seed", str(SEED + run_no), *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                             ("steps", "batch", "response_length", "ppo_epochs", "mini_batches",
                                              "micro_batch", "threads"))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, env=env, cwd=str(work), capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"run failed (rc {proc.returncode})")
    return json.loads(out.read_text())


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--steps", type=int, default=9, help="PPO steps per run; the first is warm-up")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--mini-batches", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=0, help="rows per forward/backward (0: the minibatch)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)
    for name in ("--work", "--out", "--start-on", "--seed"):
        p.add_argument(name, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.drive:
        args.seed, args.start_on, args.threads = int(args.seed), int(args.start_on), int(args.threads)
        return args
    if args.steps < 3:
        p.error("--steps must be >= 3 (the first step is warm-up)")
    mini = args.batch // args.mini_batches
    args.micro_batch = args.micro_batch or mini
    if args.batch % args.mini_batches or mini % args.micro_batch:
        p.error("--mini-batches must divide --batch and --micro-batch the minibatch")
    return args


def main() -> None:
    args = parse_args()
    if args.drive:
        drive(args)
        return
    work = prepare(args.model, n_prompts=args.batch * args.steps * 2)
    print(f"ppo.reuse_rollout_forward on/off, model={args.model} batch={args.batch} "
          f"response_length={args.response_length} ppo_epochs={args.ppo_epochs} mini_batches={args.mini_batches} "
          f"micro_batch={args.micro_batch} steps={args.steps} (first excluded) runs={args.runs} "
          f"threads={args.threads}")
    steps = []
    for r in range(args.runs):
        rows = run_once(work, args, start_on=r % 2 == 0, run_no=r)
        steps += rows
        print(f"run {r + 1} (wall update/step, cpu update/step s): " + "  ".join(
            f"{'on' if x['reuse'] else 'off'} {x['update']:.2f}/{x['step']:.2f},{x['update_cpu']:.2f}/{x['step_cpu']:.2f}"
            for x in rows), flush=True)
    keys = ("update", "step", "update_cpu", "step_cpu")
    med = {mode: {k: statistics.median(x[k] for x in steps if x["reuse"] == mode) for k in keys}
           for mode in (True, False)}
    for mode in (True, False):
        m = med[mode]
        print(f"median {'on' if mode else 'off':>3} ({sum(x['reuse'] == mode for x in steps)} steps): wall update "
              f"{m['update']:.3f} s, step {m['step']:.3f} s; cpu update {m['update_cpu']:.3f} s, step {m['step_cpu']:.3f} s")
    ratio = {k: med[False][k] / med[True][k] for k in keys}
    print(f"ratio off/on wall update: {ratio['update']:.2f} step: {ratio['step']:.2f}  "
          f"cpu update: {ratio['update_cpu']:.2f} step: {ratio['step_cpu']:.2f}")


if __name__ == "__main__":
    main()
