"""Host memory while a ZeRO-3 PPO run loads its four models: partitioned at load (zero.Init) vs whole.

    python bench/zero3_load_memory.py                         # 2 CPU ranks, 4 models of 21.5 M parameters
    python bench/zero3_load_memory.py --ranks 4 --hidden 1024 --layers 8

Builds a random-init Llama (policy) and its reward-model twin of the given shape in float32, as an SFT
and a reward stage leave them, then launches `deepspeed --num_gpus RANKS` (CPU ranks with gloo where there
is no GPU) twice: each rank runs `rlhf.stages.ppo.build_models` with every role at ZeRO-3 in bfloat16, once
as the package does it (`engine.partitioned_loading`: each ZeRO-3 role built under DeepSpeed's zero.Init)
and once with that turned off (every model loaded whole, then sharded by `engine.wrap`). Each rank reports
its peak resident memory (VmHWM) from just before the first load to the first `engine.wrap`, above what
it held before; DeepSpeed is imported and its comm layer started before that point in both runs. The last
line is `ratio partitioned/whole (max over ranks): X.XX`.

The float32 checkpoints loaded as bfloat16 make a whole load convert (copy) every tensor, as a GPU run
loading a float32 SFT output does; loaded in the file's own dtype, a whole load maps the file and costs
little resident memory until the weights are touched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(config: str, out: Path, whole: bool) -> None:
    """One rank: build the PPO models and write its peak while loading to OUT/rank<r>.json."""
    import contextlib

    import torch
    import torch.distributed as dist

    from rlhf import engine, models
    from rlhf.config import load_config
    from rlhf.stages import ppo

    cfg = load_config(config)
    engine.init_distributed()
    try:
        if whole:
            engine.partitioned_loading = lambda *args, **kwargs: contextlib.nullcontext()
        run_dir = cfg.run.dir
        tokenizer = models.load_tokenizer(str(run_dir / "sft" / "final"), padding_side="left")
        engine.skip_cpu_shm_comm()
        import deepspeed

        deepspeed.comm.init_distributed(dist_backend=dist.get_backend())
        loaded = []  # VmHWM at the first engine.wrap: every model is loaded by then
        wrap = engine.wrap

        def wrap_after_loading(*args, **kwargs):
            if not loaded:
                loaded.append(_rss_kib("VmHWM"))
            return wrap(*args, **kwargs)

        engine.wrap = wrap_after_loading
        # Code both ways import sooner or later, imported before the peak is taken: DeepSpeed's ZeRO-3 and
        # transformers' DeepSpeed integration (a partitioned load needs them first, a whole one at `wrap`)
        # and the model classes. What is left is the loading itself.
        import deepspeed.runtime.zero.partition_parameters  # noqa: F401
        import transformers.integrations.deepspeed  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401

        engine.barrier()
        Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the current RSS
        before = _rss_kib("VmRSS")
        device = engine.device(cfg.run.device)
        ppo.build_models(cfg, str(run_dir / "sft" / "final"), str(run_dir / "reward" / "final"), tokenizer,
                         torch.device(device))
        (out / f"rank{engine.rank()}.json").write_text(json.dumps({"peak_kib": loaded[0] - before}))
    finally:
        engine.cleanup()


def _setup(work: Path, args) -> Path:
    """The models as finished sft/ and reward/ stages, prompts, and a PPO config with ZeRO-3 everywhere."""
    import yaml

    from rlhf import artifacts
    from rlhf.tiny import build_tiny, build_tiny_reward

    size = {"vocab_size": 1000, "hidden_size": args.hidden, "layers": args.layers, "heads": args.heads,
            "kv_heads": args.heads}
    run_dir = work / "runs" / "bench"
    for stage, build in (("sft", build_tiny), ("reward", build_tiny_reward)):
        build(run_dir / stage / "final", **size)
        artifacts.write_manifest(run_dir / stage, stage, inputs={}, config_hash="bench", metrics={})
    prompts = work / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hello?"}]}) + "\n", encoding="utf-8")
    cfg = {"run": {"name": "bench", "output_dir": str(work / "runs"), "seed": 0, "device": args.device},
           "model": {"name_or_path": str(run_dir / "sft" / "final"), "dtype": "bfloat16"},
           "data": {"prompts": str(prompts), "eval_fraction": 0.0, "max_length": 64, "max_prompt_length": 32},
           "final_stage": "ppo", "ppo": {"steps": 1, "rollout_batch_size": 4},
           "deepspeed": {"enabled": True, "zero_stage": 3},
           "logging": {"progress": False, "tensorboard": False, "plots": False}}
    path = work / "ppo.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _launch(config: Path, out: Path, ranks: int, whole: bool) -> list[int]:
    out.mkdir(parents=True)
    # glibc's malloc raises its mmap threshold to the size of each large block freed, after which blocks of
    # that size come from the heap, whose freed holes it cannot give back: a partitioned load frees a whole
    # tensor per parameter just built, so the peak would measure that fragmentation rather than the loading.
    # A fixed threshold keeps large blocks mmapped (returned when freed), in both runs alike.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    if not _cuda():
        env.update({"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""})
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(29500 + os.getpid() % 500 + int(whole)),
           __file__, "--worker", str(config), str(out), *(["--whole"] if whole else [])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"zero3_load_memory: the launch failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text())["peak_kib"] for r in range(ranks)]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--device", default="auto", help="run.device of the ranks (auto: the GPU where there is one)")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # added by the launcher
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), args.whole)
        return
    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-zero3-load-"))
    try:
        config = _setup(work, args)
        params = sum(f.stat().st_size for f in (work / "runs" / "bench" / "sft" / "final").glob("*.safetensors")) // 4
        print(f"{args.ranks} ranks, 4 models of {params / 1e6:.1f} M parameters (float32 files, loaded as bfloat16)")
        partitioned = _launch(config, work / "partitioned", args.ranks, whole=False)
        whole = _launch(config, work / "whole", args.ranks, whole=True)
        for rank, (p, w) in enumerate(zip(partitioned, whole, strict=True)):
            print(f"rank {rank}: peak while loading {p / 1024:.0f} MiB partitioned, {w / 1024:.0f} MiB whole "
                  f"({p / w:.2f}x)")
        print(f"ratio partitioned/whole (max over ranks): {max(p / w for p, w in zip(partitioned, whole, strict=True)):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
