"""`rlhf <command> --config FILE [--set key.sub=value ...]`.

Every training command also runs under a launcher:
  deepspeed --num_gpus 2 --module rlhf.cli reward --config FILE
  torchrun --nproc_per_node 2 -m rlhf.cli sft --config FILE
Heavy imports happen inside the command functions, so `rlhf --help` and `rlhf preflight` stay fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import traceback
import warnings

from rlhf.errors import ConfigError, RlhfError, StopRequested

TRAIN_COMMANDS = ("sft", "reward", "ppo", "dpo", "orpo")
SYNTH_METHODS = ("program", "constitutional", "judge")
SYNTH_K = {"program": 4, "constitutional": 1, "judge": 2}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="pipeline YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sft.learning_rate=1e-5 (repeatable)")


def _add_synth_parser(dsub) -> None:
    q = dsub.add_parser("synth", help="SFT and preference sets from the base model's samples, labeled by a program, "
                        "by critique and revision, or by a model judge")
    _add_config_args(q)
    q.add_argument("--out", required=True, help="output dir (JSONL sets + manifest.json); constitutional and "
                   "judge runs resume from it")
    q.add_argument("--method", choices=SYNTH_METHODS, default="program",
                   help="program: k samples ranked by --judge; constitutional: a sample critiqued and revised "
                   "under --principles (revision chosen); judge: pairs of samples judged by --judge-model")
    q.add_argument("--k", type=int, help="samples per prompt (default: program 4, judge 2, constitutional 1; "
                   "constitutional keeps the first that finishes)")
    q.add_argument("--judge", metavar="MODULE:FUNCTION",
                   help="program judge fn(prompts, responses) -> scores (default rlhf.judges:positivity)")
    q.add_argument("--principles", metavar="FILE", help="constitutional: YAML `principles:` list of {name, "
                   "critique, revision}")
    q.add_argument("--critic-model", metavar="MODEL", help="constitutional: the model that critiques and revises "
                   "(default: the config's model)")
    q.add_argument("--critique-tokens", type=int, default=64, help="constitutional: critique length limit")
    q.add_argument("--judge-model", metavar="MODEL", help="judge: the model that compares two responses")
    q.add_argument("--judge-template", metavar="FILE", help="judge: prompt template with {prompt}, {response_a} "
                   "and {response_b}, answered with A or B")
    q.add_argument("--gold-judge", metavar="MODULE:FUNCTION", help="constitutional, judge: report how often this "
                   "program judge prefers each pair's chosen side (manifest.json)")
    q.add_argument("--prompts", metavar="FILE", help="prompt file (default: the built-in quickstart prompts)")
    q.add_argument("--n-prompts", type=int, metavar="N", help="use the first N training prompts")
    q.add_argument("--n-eval-prompts", type=int, metavar="N", help="use the first N held-out prompts")
    q.add_argument("--max-new-tokens", type=int, default=48, help="sample length limit (unfinished samples are dropped)")
    q.add_argument("--temperature", type=float, help="sampling temperature (default ppo.temperature)")
    q.add_argument("--batch-size", type=int, default=64, help="sequences per generate() call")
    q.add_argument("--min-gap", type=float, default=0.0,
                   help="pairs need chosen - rejected score (judge: the probability margin) > this")
    q.add_argument("--pairs", choices=("best-worst", "all"), default="best-worst",
                   help="best vs worst per prompt (judge: the largest margin), or every two samples of a prompt "
                   "(more pairs, same samples)")
    q.add_argument("--from-samples", metavar="FILE",
                   help="re-judge and re-select the samples.jsonl of an earlier run instead of sampling")
    q.add_argument("--seed", type=int, help="prompt split and sampling seed (default run.seed)")
    q.set_defaults(func=_cmd_data_synth)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="The classic RLHF pipeline: SFT -> reward -> PPO | DPO | ORPO.")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in TRAIN_COMMANDS:
        p = sub.add_parser(name, help=f"run the {name} stage")
        _add_config_args(p)
        p.add_argument("--restart", action="store_true", help="ignore existing checkpoints and start over")
        p.set_defaults(func=_cmd_stage, stage=name)
    p = sub.add_parser("pipeline", help="run every stage the config needs, skipping complete ones")
    _add_config_args(p)
    p.add_argument("--restart", action="store_true", help="re-run every stage from scratch")
    p.add_argument("--stages", action="store_true", help="print the stages this config runs and exit")
    p.add_argument("--pending", action="store_true", help="print the stages not yet complete and exit")
    p.set_defaults(func=_cmd_pipeline)
    p = sub.add_parser("preflight", help="check config, data, models and environment; exit 2 on any blocker")
    _add_config_args(p)
    p.add_argument("--stage", choices=TRAIN_COMMANDS, help="check one stage as if started on its own")
    p.set_defaults(func=_cmd_preflight)
    _add_fetch_parser(sub)
    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("inspect", help="report format and how it was read, lengths, duplicates, bad rows and "
                        "verbosity bias")
    q.add_argument("path", nargs="?", help="data file, save_to_disk dir or hub dataset name")
    q.add_argument("--columns", action="append", default=[], metavar="KEY=THEIRS",
                   help="read the file's key THEIRS as the schema's KEY, e.g. --columns prompt=question (repeatable)")
    q.add_argument("--config", help="instead of a path: every source the config's stages read, mapped and mixed "
                   "as they read it")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (with --config)")
    q.add_argument("--split", default="train")
    q.add_argument("--tokenizer", help="tokenizer dir/alias for token lengths (default: word counts)")
    q.add_argument("-n", "--examples", type=int, default=3, help="example rows to print")
    q.set_defaults(func=_cmd_data_inspect)
    _add_synth_parser(dsub)
    p = sub.add_parser("score", help="score prompt/response rows with a reward model (JSONL out)")
    p.add_argument("--model", required=True, help="reward model dir (or the reward stage's dir), alias or hub id")
    p.add_argument("--data", required=True, help="rows with prompt+completion (or prompt/chosen/rejected)")
    p.add_argument("--out", help="output JSONL (default: stdout)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.set_defaults(func=_cmd_score)
    p = sub.add_parser("eval", help="compare the run's final models on held-out prompts (table, eval.json, chart)")
    _add_config_args(p)
    p.add_argument("--models", nargs="+", metavar="MODEL",
                   help="base, sft, ppo, dpo, orpo or model dirs (default: base + every completed stage)")
    p.add_argument("--prompts", type=int, metavar="N", help="evaluate on the first N held-out prompts")
    p.add_argument("--judge", metavar="MODULE:FUNCTION",
                   help="gold judge fn(prompts, responses) -> scores; it also gets the fields of the eval prompt "
                   "rows that it names as parameters (e.g. answer), as lists")
    p.add_argument("--sample", action="store_true", help="sample with the ppo section's settings (default greedy)")
    p.add_argument("--max-new-tokens", type=int, help="response length limit (default ppo.max_new_tokens)")
    p.set_defaults(func=_cmd_eval)
    _add_plan_parser(sub)
    _add_chat_parser(sub)
    _add_export_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_fetch_parser(sub) -> None:
    p = sub.add_parser("fetch", help="put the models the stages read on this machine (aliases built, hub ids "
                       "downloaded) before a launch")
    _add_config_args(p)
    p.add_argument("--stages", nargs="+", choices=TRAIN_COMMANDS, help="the stages to fetch for (default: the file's)")
    p.set_defaults(func=_cmd_fetch)


def _add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of each model of the final stage; cheapest ZeRO settings that fit")
    _add_config_args(p)
    p.add_argument("--gpus", type=int, default=int(os.environ.get("NUM_GPUS") or 1), help="GPUs per node")
    p.add_argument("--nodes", type=int, default=int(os.environ.get("NNODES") or 1), help="nodes")
    p.add_argument("--gpu-mem", type=float, default=float(os.environ.get("RLHF_GPU_MEM_GIB") or 0) or None,
                   metavar="GiB", help="memory per GPU; enables the fit check and the suggestion")
    p.add_argument("--stage", choices=TRAIN_COMMANDS, help="plan this stage instead of the config's last one")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON instead of a table")
    p.set_defaults(func=_cmd_plan)


def _add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="talk to a model in the terminal (streamed), or answer --prompt / stdin lines")
    p.add_argument("--model", required=True, help="a stage's final/ (or stage dir), a checkpoint, a model dir, "
                   "hub id or alias")
    p.add_argument("--compare", metavar="MODEL", help="a second model: both answer every message, one after the other")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="answer this prompt and exit (repeatable; each in a fresh conversation). Without a "
                   "terminal, stdin's lines are the prompts")
    p.add_argument("--system", metavar="TEXT", help="system message")
    p.add_argument("--jsonl", action="store_true", help="with prompts: one JSON line per prompt with every reply")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (ignores the sampling flags)")
    p.add_argument("--seed", type=int, help="re-seed before every reply (reproducible replies)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: bfloat16 on a GPU that has it, else float32")
    p.set_defaults(func=_cmd_chat)


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint of any stage -> a plain HF model dir with its tokenizer")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="<run>/<stage>/checkpoints/checkpoint-<step>")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) output dir")
    p.add_argument("--role", choices=("actor", "critic"), help="which model of a PPO checkpoint (default actor)")
    p.add_argument("--adapter-only", action="store_true", help="keep a LoRA adapter as an adapter (default: merged)")
    p.add_argument("--config", help="the run's config, when the stage dir has no config.resolved.yaml")
    p.set_defaults(func=_cmd_export)


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="score prompt/response pairs over HTTP (POST /score, OpenRLHF's /get_reward, "
                       "GET /health) for a final stage elsewhere (ppo.rewards: [{url: ...}])")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="reward model: the reward stage's dir or its final/, a model dir, alias or hub id")
    what.add_argument("--program", metavar="MODULE:FUNCTION", help="a program reward instead of a model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; beyond loopback a token is required")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get("RLHF_SERVE_TOKEN") or None,
                   help="bearer token checked on every request (default: $RLHF_SERVE_TOKEN)")
    p.add_argument("--max-batch", type=int, default=64, help="pairs scored together, over concurrent requests")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    p.add_argument("--max-queue", type=int, default=4096,
                   help="pairs that may wait; a request past that gets 503 (busy), which clients retry")
    p.add_argument("--max-length", type=int, default=1024, help="longer sequences keep their end (the EOS)")
    p.add_argument("--max-body-mb", type=float, default=8.0, help="larger request bodies are refused (413)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: bfloat16 on a GPU that has it, else float32")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from rlhf.commands.serve import serve

    return serve(args.model, args.program, host=args.host, port=args.port, token=args.token,
                 max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, device=args.device, dtype=args.dtype,
                 max_length=args.max_length, max_body_mb=args.max_body_mb, max_queue=args.max_queue)


def _load(args):
    from rlhf.config import load_config

    cfg = load_config(args.config, args.overrides)
    if not cfg.logging.progress:
        _progress_bars_off()
    return cfg


def _progress_bars_off() -> None:
    """`logging.progress: false` for the bars of transformers and huggingface_hub too (weight loading, shard
    writing). transformers takes huggingface_hub's switch when it is imported, so it is switched here only
    when it already is (importing it would cost a second)."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _cmd_stage(args) -> int:
    from rlhf.stages import run_stage

    result = run_stage(args.stage, _load(args), restart=args.restart)
    return 0 if result is not None else 1


def _cmd_pipeline(args) -> int:
    cfg = _load(args)
    if args.stages or args.pending:
        from rlhf.stages import pending_stages  # refuses a stage trained under other values of its keys

        stages = cfg.stages if args.stages or args.restart else pending_stages(cfg)
        print(" ".join(stages))
        return 0
    from rlhf.stages import run_pipeline

    run_pipeline(cfg, restart=args.restart)
    return 0


def _cmd_preflight(args) -> int:
    from rlhf import preflight

    cfg = _load(args)
    stages = [args.stage] if args.stage else cfg.stages
    blockers = preflight.check(cfg, stages, standalone=bool(args.stage))
    if blockers:
        print(preflight.format_blockers(blockers), file=sys.stderr)
        return 2
    print(f"preflight ok: {cfg.source}: stages {', '.join(stages)}")
    return 0


def _cmd_fetch(args) -> int:
    from rlhf.commands import fetch

    cfg = _load(args)
    print("\n".join(fetch.run(cfg, args.stages or cfg.stages)), flush=True)
    return 0


def _cmd_data_inspect(args) -> int:
    from rlhf import data

    if (args.path is None) == (args.config is None):
        raise ConfigError("rlhf data inspect: give either a data path or --config FILE")
    tokenizer = None
    if args.tokenizer:
        from rlhf import models

        tokenizer = models.load_tokenizer(models.resolve_model(args.tokenizer))
    options = {"tokenizer": tokenizer, "n_examples": args.examples}
    if args.path is not None:
        pairs = [item.partition("=") for item in args.columns]
        if any(not sep or not key or not theirs for key, sep, theirs in pairs):
            raise ConfigError("--columns: expected KEY=THEIRS, e.g. --columns prompt=question")
        source = {"path": args.path, "columns": {key: theirs for key, _, theirs in pairs}}
        print(data.format_report(data.inspect(source, split=args.split, **options)))
        return 0
    cfg = _load(args)
    if tokenizer is None:  # lengths in the policy's tokens, as preflight counts them (words if it is not here)
        options["tokenizer"] = data.report.policy_tokenizer(cfg)
    blocks = []
    for name, kind, source in data.config_sources(cfg):
        parts = data.parts(source)
        reports = [data.inspect(part, split=cfg.data.split, kind=kind, **options) for part in parts]
        for i, report in enumerate(reports):
            where = f"{name}[{i}]" if len(parts) > 1 else name
            blocks.append(f"== {where}, read as {kind} ==\n{data.format_report(report)}")
        if len(parts) > 1 or parts[0].weight != 1.0:
            blocks.append("\n".join(data.mix_lines(name, reports)))
    print("\n\n".join(blocks))
    return 0


def _check_synth_args(args) -> None:
    """Each method's own flags, and no flag of another method (which would be silently ignored)."""
    own = {"program": ("judge", "from_samples"), "constitutional": ("principles", "critic_model", "gold_judge"),
           "judge": ("judge_model", "judge_template", "gold_judge")}
    needed = {"constitutional": "principles", "judge": "judge_model"}.get(args.method)
    if needed and getattr(args, needed) is None:
        raise ConfigError(f"--method {args.method} needs --{needed.replace('_', '-')}")
    foreign = sorted({k for keys in own.values() for k in keys} - set(own[args.method]))
    given = [f"--{k.replace('_', '-')}" for k in foreign if getattr(args, k) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: not a flag of --method {args.method}"
                          + ("; for the model judge use --judge-model, and --gold-judge to score the pairs with a "
                             "program" if "--judge" in given else ""))


def _cmd_data_synth(args) -> int:
    from rlhf.commands.synth import SynthSettings, run_synth

    _check_synth_args(args)
    cfg = _load(args)
    from rlhf import engine
    from rlhf.commands.evaluation import load_judge

    load_judge(args.gold_judge, "--gold-judge")  # both fail before any model loads
    if args.from_samples is None:
        engine.usable_device(cfg.run.device, source=cfg.source)
    settings = SynthSettings(k=args.k or SYNTH_K[args.method], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature if args.temperature is not None else cfg.ppo.temperature,
                             top_p=cfg.ppo.top_p, top_k=cfg.ppo.top_k, batch_size=args.batch_size,
                             min_gap=args.min_gap, pairs=args.pairs,
                             seed=cfg.run.seed if args.seed is None else args.seed)
    prompts = {"n_prompts": args.n_prompts, "n_eval_prompts": args.n_eval_prompts, "prompts_file": args.prompts,
               "command": _synth_command(args, settings)}
    if args.method == "constitutional":
        from rlhf.commands.constitutional import run_constitutional

        run_constitutional(cfg, args.out, principles_file=args.principles, critic_model=args.critic_model,
                           settings=settings, critique_tokens=args.critique_tokens, gold_judge=args.gold_judge,
                           **prompts)
    elif args.method == "judge":
        from rlhf.commands.llm_judge import run_judge

        run_judge(cfg, args.out, judge_model=args.judge_model, template_file=args.judge_template,
                  settings=settings, gold_judge=args.gold_judge, **prompts)
    else:
        run_synth(cfg, args.out, settings=settings, judge=args.judge or "rlhf.judges:positivity",
                  samples_file=args.from_samples, **prompts)
    return 0


def _synth_command(args, s) -> str:
    """The command with every setting spelled out, for the manifest (regenerates the same sets)."""
    import shlex

    parts = ["rlhf", "data", "synth", "--config", args.config]
    for item in args.overrides:
        parts += ["--set", item]
    parts += ["--out", args.out, "--k", str(s.k)]
    if args.method == "program":
        parts += ["--judge", args.judge or "rlhf.judges:positivity"]
    else:
        parts += ["--method", args.method]
    if args.method == "constitutional":
        parts += ["--critique-tokens", str(args.critique_tokens)]
    for flag, value in (("--principles", args.principles), ("--critic-model", args.critic_model),
                        ("--judge-model", args.judge_model), ("--judge-template", args.judge_template),
                        ("--gold-judge", args.gold_judge),
                        ("--prompts", args.prompts), ("--n-prompts", args.n_prompts),
                        ("--n-eval-prompts", args.n_eval_prompts), ("--from-samples", args.from_samples)):
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--max-new-tokens", str(s.max_new_tokens), "--temperature", str(s.temperature),
              "--batch-size", str(s.batch_size), "--min-gap", str(s.min_gap), "--pairs", s.pairs,
              "--seed", str(s.seed)]
    return shlex.join(parts)


def _cmd_score(args) -> int:
    from rlhf.scoring import score_file

    score_file(args.model, args.data, out=args.out, batch_size=args.batch_size, max_length=args.max_length,
               device=args.device)
    return 0


def _cmd_eval(args) -> int:
    from rlhf.commands.evaluation import run_eval

    run_eval(_load(args), model_names=args.models, n_prompts=args.prompts, judge=args.judge, sample=args.sample,
             max_new_tokens=args.max_new_tokens)
    return 0


def _cmd_plan(args) -> int:
    """Table (or JSON) of the memory estimate; exit 2 when --gpu-mem is given and the configured settings do not fit."""
    import json

    from rlhf import plan
    from rlhf.errors import ConfigError

    cfg = _load(args)
    if args.gpus < 1 or args.nodes < 1:
        raise ConfigError("--gpus and --nodes must be >= 1")
    if args.json:
        est = plan.estimate(cfg, gpus=args.gpus, nodes=args.nodes, stage=args.stage)
        print(json.dumps(est.to_json(), indent=2))
        return 0 if args.gpu_mem is None or est.fits(args.gpu_mem) else 2
    text, ok = plan.report(cfg, gpus=args.gpus, nodes=args.nodes, gpu_mem_gib=args.gpu_mem, stage=args.stage)
    print(text)
    return 0 if ok else 2


def _cmd_chat(args) -> int:
    from rlhf.commands.chat import Sampling, run_chat

    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, greedy=args.greedy, seed=args.seed)
    names = [args.model] + ([args.compare] if args.compare else [])
    return run_chat(names, sampling, device=args.device, dtype=args.dtype, system=args.system, prompts=args.prompt,
                    jsonl=args.jsonl)


def _cmd_export(args) -> int:
    from rlhf.commands.export import export

    out = export(args.checkpoint, args.out, role=args.role, adapter_only=args.adapter_only, config_path=args.config)
    print(f"exported to {out}")
    return 0


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s rlhf %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "datasets", "DeepSpeed", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    # peft and trl still read this deprecated alias on every model they wrap; nothing a user can act on.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if shutil.which("nvidia-smi") is None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise probes for GPUs and warns
    if args.command in (*TRAIN_COMMANDS, "pipeline"):  # training outlives its terminal; `rlhf score | head` need not
        from rlhf.console import survive_closed_output

        survive_closed_output()
    _setup_logging()
    ok, failure = False, "unknown error"
    try:
        code = int(args.func(args) or 0)
        ok = True
        return code
    except RlhfError as err:
        if os.environ.get("RLHF_DEBUG"):
            traceback.print_exc()
        # A requested stop is not an error (every rank saved and stops alike; it exits 128 + the signal's number);
        # a config error holds one line per problem of the file.
        ok, failure = err.exit_code == 0 or isinstance(err, StopRequested), str(err)
        lines = str(err).splitlines() if isinstance(err, ConfigError) else [str(err)]
        print("\n".join(line if ok else f"error: {line}" for line in lines), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        failure = "interrupted"
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except SystemExit as err:
        ok = err.code in (0, None)
        failure = f"exit status {err.code}"
        raise
    except BaseException as err:
        failure = f"{type(err).__name__}: {err}"
        raise
    finally:
        from rlhf import engine, failwatch

        if not ok:  # ranks on other nodes would otherwise wait in their next collective until its timeout
            failwatch.announce(failure)
        # After a failure the other ranks are elsewhere: a barrier would wait forever.
        engine.cleanup(wait_for_others=ok)


if __name__ == "__main__":
    sys.exit(main())
