"""Assertions for scripts/gpu_check.sh, on the files a run leaves (standard library only).

  env --device cuda|cpu                        versions and the GPU; exit 1 when CUDA is asked for and absent
  stage RUN STAGE [--prefix P] [--roles R,..] [--steps N]
                                              RUN/STAGE/stage.json exists; every `devices` value starts with P
                                              (and names each role R); `global_step` == N
  memory RUN --prefix P [--zero ROLE=STAGE ..] RUN/ppo/memory.json: the PPO device starts with P; each ROLE
                                              ran at that ZeRO stage
  eval RUN --models M,.. [--prefix P]         RUN/eval/eval.json lists each model M, each on a device starting
                                              with P (its `devices`)
  peak RUN PLAN_JSON --slack-mib S             measured CUDA peak (memory.json) vs `rlhf plan --json` peak

Each prints what it found and exits 0 (pass), 1 (fail) or 3 (nothing to compare: `peak` without a CUDA figure
on a CPU run).
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
    if any(v.endswith("MISSING") for v in versions):
        raise Fail("missing: " + ", ".join(v.split()[0] for v in versions if v.endswith("MISSING")))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("env")
    q.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
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
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except Fail as err:
        print(f"FAIL: {err}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
