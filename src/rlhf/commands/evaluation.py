"""`rlhf eval`: the final models of a run, side by side on the same held-out prompts.

For every model (default: the base model and every completed sft/ppo/dpo/orpo stage of the run) one
response per prompt is generated, greedy by default (`--sample` samples with the ppo section's settings),
at most `ppo.max_new_tokens` tokens. Then, per model:

- reward: mean score of the run's reward model (`<run>/reward/final`), when that stage is complete;
- judge: mean score of an optional programmatic judge, `--judge module:function(prompts, responses) -> scores`,
  called as the final stage calls a program reward (`rlhf.programs.Program`): with each field of the prompt
  rows that it names as a parameter (`answer` for `rlhf.tasks.arithmetic:exact_number`, whose mean is then
  exact-match accuracy), as lists aligned with the responses;
- kl: mean over responses of sum_t [log pi(y_t) - log ref(y_t)] on the model's own responses, with the
  SFT model (or the base model when the run has none) as reference. On sampled responses this is the usual
  Monte-Carlo KL(pi || ref) estimate; on greedy responses it is the log-ratio at the policy's mode, a
  deterministic proxy that is 0 for the reference itself;
- length: mean response length in tokens (EOS not counted);
- win_rate: share of prompts where the model's response scores higher than the baseline's (the SFT
  model, else the base model) by the judge when given, else by the reward model; ties count half;
- lc_win_rate: the same at equal length (`verbosity.length_controlled_win_rate`: a logistic fit of the
  outcome on the length difference, read at zero difference), so a model that wins by writing longer
  (or shorter) replies than the baseline shows it as a gap between the two win rates.

The prompts: `data.prompts_eval`, else the held-out split of the prompt data; at most `data.eval_max_rows`
of them (a sample seeded by `run.seed` when there are more; eval.json records both counts), or the first N
with `--prompts N`.

Writes `<run>/eval/eval.json`, `responses.jsonl` and `eval.png` (reward versus KL per model, and bars of
the judge/reward scores), and prints a table. Single process; models are loaded one at a time next to
the reference and the reward model.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf import artifacts, claims, models
from rlhf.config import PipelineConfig
from rlhf.errors import ConfigError

log = logging.getLogger("rlhf")
STAGES = ("sft", "ppo", "dpo", "orpo")


# ----------------------------------------------------------------------------------------------- models


@dataclass
class Candidate:
    name: str
    path: str
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    rewards: list[float] | None = None
    judge: list[float] | None = None
    kl: list[float] | None = None
    eos_id: int | None = None
    device: str = ""  # where the model ran ("cuda:0", "cpu")


def default_models(cfg: PipelineConfig) -> list[str]:
    return ["base"] + [s for s in STAGES if artifacts.is_complete(cfg.stage_dir(s))]


def resolve(cfg: PipelineConfig, name: str) -> tuple[str, str]:
    """(display name, model dir or id) for `base`, a stage name of the run, a stage dir (its final/), or a
    model dir/alias/hub id."""
    if name == "base":
        return "base", models.resolve_model(cfg.model.name_or_path)
    if name in STAGES:
        return name, str(artifacts.stage_output(cfg.stage_dir(name), name, needed_by="`rlhf eval`",
                                                config_path=cfg.source))
    final = artifacts.final_of_stage_dir(name, needed_by="`rlhf eval`")
    if final is not None:
        return final.parent.name, str(final)
    return Path(name).name or name, models.resolve_model(name)


def baseline(cfg: PipelineConfig) -> tuple[str, str]:
    """The reference for KL and the opponent for win rates: the SFT model, else the base model."""
    return resolve(cfg, "sft") if artifacts.is_complete(cfg.stage_dir("sft")) else resolve(cfg, "base")


def load_judge(spec: str | None, flag: str = "--judge"):
    """The program judge `module:function` named by `spec` (None: none); errors name `flag`, the option
    that gave it."""
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"{flag} {spec}: expected module:function")
    if os.getcwd() not in sys.path:  # judges usually live next to the config, not in an installed package
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{flag} {spec}: cannot import it ({err})") from None


def eval_prompts(cfg: PipelineConfig, limit: int | None) -> tuple[list[list[dict]], int]:
    """(the prompts of `eval_rows`, how many there were to pick from)."""
    rows, n_available = eval_rows(cfg, limit)
    return [r["prompt"] for r in rows], n_available


def eval_rows(cfg: PipelineConfig, limit: int | None) -> tuple[list[dict], int]:
    """(the prompt rows to evaluate, with their `fields` where they have any; how many there were to pick
    from): data.prompts_eval, else the eval split of the prompt data (as PPO splits it).

    `limit` (`--prompts N`) takes the first N. Without it at most `data.eval_max_rows` are evaluated (as
    every stage's held-out check): when there are more, a sample seeded by `run.seed`, in file order; null
    takes them all. One log line says how many of how many, and how they were picked."""
    from rlhf import data
    from rlhf.data import load_rows

    what = "held-out prompts"
    if cfg.data.prompts_eval:
        rows = data.load(cfg.data.prompts_eval, "prompt", split=cfg.data.split, bad_rows=cfg.data.bad_rows).rows
        where = data.label(cfg.data.prompts_eval)
    else:
        train, rows, where = load_rows(cfg, "ppo", "prompt")
        if not rows:
            log.warning("%s: no held-out prompts (data.eval_fraction is 0 and data.prompts_eval unset); "
                        "evaluating on the training prompts", where)
            rows, what = train, "training prompts"
    if limit:
        picked, how = rows[:limit], f"the first ones (--prompts {limit})"
    else:
        bound = cfg.data.eval_max_rows
        picked, how = rows, f"all of them (data.eval_max_rows={bound})"
        if bound is not None and len(rows) > bound:
            order = list(range(len(rows)))
            random.Random(cfg.run.seed).shuffle(order)
            picked = [rows[i] for i in sorted(order[:bound])]
            how = (f"a sample seeded by run.seed (data.eval_max_rows={bound}; --prompts N takes the first N "
                   "instead)")
    if rows:
        log.info("eval: %d of %d %s of %s: %s", len(picked), len(rows), what, where, how)
    return picked, len(rows)


# ------------------------------------------------------------------------------------------- generation


@dataclass
class GenSettings:
    max_new_tokens: int
    max_prompt_length: int
    sample: bool
    temperature: float
    top_p: float
    top_k: int
    seed: int
    batch_size: int = 32


def generate(model, tokenizer, prompts: list[list[dict]], gen: GenSettings, cand: Candidate) -> None:
    """Fill `cand` with prompt ids, response ids (up to and including EOS) and decoded responses, sampled
    with `rlhf.generation.sample` (greedy unless `gen.sample`)."""
    import torch

    from rlhf.batching import encode_prompts
    from rlhf.generation import Sampling, hf_config, sample

    sampling = Sampling(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p, greedy=not gen.sample)
    config = hf_config(tokenizer, sampling, gen.max_new_tokens)
    torch.manual_seed(gen.seed)
    for start in range(0, len(prompts), gen.batch_size):
        ids, mask = encode_prompts(tokenizer, prompts[start:start + gen.batch_size], gen.max_prompt_length,
                                   model.device)
        out = sample(model, tokenizer, ids, mask, config)
        cand.response_ids += out.token_lists()
        cand.responses += out.texts
        for row, row_mask in zip(ids.tolist(), mask.tolist(), strict=True):
            cand.prompt_ids.append([t for t, m in zip(row, row_mask, strict=True) if m])


def response_kl(policy, ref, pad_id: int, cand: Candidate) -> list[float]:
    """Per response: KL(policy || reference) summed over its tokens (`forwards.sequence_kl`), on the policy's
    ids."""
    from rlhf.forwards import sequence_kl

    seqs = [(p + r, len(p)) for p, r in zip(cand.prompt_ids, cand.response_ids, strict=True)]
    return sequence_kl(policy, ref, seqs, pad_id)


# ------------------------------------------------------------------------------------------------ run


def _mean(values: list[float] | None) -> float | None:
    return None if not values else float(sum(values) / len(values))


def _se(values: list[float] | None) -> float | None:
    """Standard error of the mean (`judges.mean_and_se`); None for fewer than 2 values."""
    from rlhf.judges import mean_and_se

    return float(mean_and_se(values)[1]) if values and len(values) >= 2 else None


def win_rate(scores: list[float] | None, base: list[float] | None) -> float | None:
    """Share of prompts where `scores` beats `base`; ties count half."""
    if scores is None or base is None:
        return None
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, base, strict=True))
    return wins / len(scores)


def _lengths(c: Candidate) -> list[float]:
    """Response lengths in tokens, EOS not counted."""
    return [float(len(r) - (1 if r and r[-1] == c.eos_id else 0)) for r in c.response_ids]


def summarize(cands: list[Candidate], base: Candidate) -> list[dict[str, Any]]:
    from rlhf.verbosity import length_controlled_win_rate

    key = "judge" if base.judge is not None else "rewards"
    base_scores, base_lengths = getattr(base, key), _lengths(base)
    rows = []
    for c in cands:
        scores, lengths = getattr(c, key), _lengths(c)
        lc = (None if scores is None or base_scores is None else
              length_controlled_win_rate(scores, base_scores, lengths, base_lengths))
        rows.append({"model": c.name, "path": c.path, "reward": _mean(c.rewards), "judge": _mean(c.judge),
                     "reward_se": _se(c.rewards), "judge_se": _se(c.judge), "kl": _mean(c.kl),
                     "length": _mean(lengths), "win_rate": win_rate(scores, base_scores), "lc_win_rate": lc,
                     "eos_rate": _mean([1.0 if r and r[-1] == c.eos_id else 0.0 for r in c.response_ids])})
    return rows


def format_table(rows: list[dict[str, Any]], baseline_name: str) -> str:
    cols = [("model", "model", "{}"), ("reward", "RM score", "{:.3f}"), ("judge", "judge", "{:.3f}"),
            ("kl", "KL(ref)", "{:.3f}"), ("length", "length", "{:.1f}"),
            ("win_rate", f"win vs {baseline_name}", "{:.3f}"), ("lc_win_rate", "length-controlled", "{:.3f}")]
    cells = [[h for _, h, _ in cols]] + [[("-" if r[k] is None else f.format(r[k])) for k, _, f in cols]
                                         for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def run_eval(cfg: PipelineConfig, *, model_names: list[str] | None = None, n_prompts: int | None = None,
             judge: str | None = None, sample: bool = False, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Generate, score and compare; returns what eval.json holds. Claims `<run>/eval` first (`rlhf.claims`):
    its three files must come from one evaluation, so a second eval of the run is refused while one runs.
    A `run.device` this machine does not have is refused before anything is read."""
    from rlhf import engine

    engine.usable_device(cfg.run.device, source=cfg.source)
    held = claims.claim(cfg.run.dir / "eval", cfg.run.claim_timeout_s)
    try:
        return _compare(cfg, model_names=model_names, n_prompts=n_prompts, judge=judge, sample=sample,
                        max_new_tokens=max_new_tokens)
    finally:
        if held is not None:
            held.release()


def _compare(cfg: PipelineConfig, *, model_names: list[str] | None, n_prompts: int | None, judge: str | None,
             sample: bool, max_new_tokens: int | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from rlhf.programs import Program

    judge_fn = load_judge(judge)
    if judge_fn is not None:  # called as a program reward: with the row fields it names (an `answer`)
        judge_fn = Program(judge, judge_fn, "--judge")
    rows, n_available = eval_rows(cfg, n_prompts)
    prompts = [r["prompt"] for r in rows]
    if not prompts:
        raise ConfigError(f"{cfg.source}: no prompts to evaluate on")
    gen = GenSettings(max_new_tokens=max_new_tokens or cfg.ppo.max_new_tokens,
                      max_prompt_length=cfg.data.max_prompt_length, sample=sample, temperature=cfg.ppo.temperature,
                      top_p=cfg.ppo.top_p, top_k=cfg.ppo.top_k, seed=cfg.run.seed)
    ref_name, ref_path = baseline(cfg)
    specs = [resolve(cfg, n) for n in (model_names or default_models(cfg))]
    if ref_name not in [n for n, _ in specs]:
        specs.append((ref_name, ref_path))  # win rates need the baseline's responses
    # The reference's tokenizer as every candidate's (below): a base model as the reference (no SFT stage)
    # gets the config's template too, so it is the same tokenizer as the trained models' and KL is computed.
    ref_tok = models.load_tokenizer(ref_path, chat_template=cfg.model.chat_template)
    ref = _load(cfg, models.load_causal_lm, ref_path, ref_tok)
    scorer = _reward_model(cfg)
    cands = []
    for name, path in tqdm(specs, desc="eval", unit="model", disable=not cfg.logging.progress):
        cands.append(_evaluate_one(cfg, name, path, rows, gen, ref, ref_tok, scorer, judge_fn))
        log.info("eval: %s done (%d responses)", name, len(prompts))
    base = next(c for c in cands if c.name == ref_name)
    rows = summarize(cands, base)
    result = {"prompts": len(prompts), "prompts_available": n_available, "baseline": ref_name, "reference": ref_path,
              "reward_model": scorer[2] if scorer else None, "judge": judge,
              "win_rate_by": "judge" if judge_fn else ("reward" if scorer else None),
              "generation": vars(gen), "models": rows, "devices": {c.name: c.device for c in cands}}
    _write(cfg, result, cands, prompts)
    print(format_table(rows, ref_name))
    return result


def _reward_model(cfg: PipelineConfig):
    """(model, tokenizer, dir) of the run's reward model, or None when the reward stage is not complete."""
    if not artifacts.is_complete(cfg.stage_dir("reward")):
        return None
    path = str(artifacts.stage_output(cfg.stage_dir("reward"), "reward", needed_by="`rlhf eval`"))
    tok = models.load_tokenizer(path)
    return _load(cfg, models.load_scalar_model, path, tok, require_head=True), tok, path


def _load(cfg: PipelineConfig, loader, path: str, tokenizer, **kwargs):
    """A model for evaluation: on the run's device (`engine.usable_device`) in the run's dtype, in eval mode."""
    from rlhf import engine

    device = engine.usable_device(cfg.run.device, source=cfg.source)
    return loader(path, tokenizer=tokenizer, dtype=engine.run_dtype(cfg, device), **kwargs).to(device).eval()


def _evaluate_one(cfg: PipelineConfig, name, path, rows, gen: GenSettings, ref, ref_tok, scorer,
                  judge_fn) -> Candidate:
    from rlhf.encoding import same_tokenizer
    from rlhf.scoring import score

    prompts = [r["prompt"] for r in rows]

    # Every model is prompted with the config's template (the base model's own may differ, e.g. inject a
    # system prompt), so all rows of the table answer the same token sequences.
    tok = models.load_tokenizer(path, padding_side="left", chat_template=cfg.model.chat_template)
    model = _load(cfg, models.load_causal_lm, path, tok)
    cand = Candidate(name, path, eos_id=tok.eos_token_id, device=str(next(model.parameters()).device))
    generate(model, tok, prompts, gen, cand)
    if same_tokenizer(tok, ref_tok):
        cand.kl = response_kl(model, ref, tok.pad_token_id, cand)
    else:
        log.warning("eval: %s has another tokenizer than the reference; its KL is not computed", name)
    if scorer is not None:
        cand.rewards = score(scorer[0], scorer[1], prompts, cand.responses)
    if judge_fn is not None:
        cand.judge = judge_fn(rows, cand.responses)
    del model
    return cand


def _write(cfg: PipelineConfig, result: dict, cands: list[Candidate], prompts: list) -> None:
    out = cfg.run.dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_json_atomic(out / "eval.json", result)
    with open(out / "responses.jsonl", "w", encoding="utf-8") as fh:
        for c in cands:
            for i, (prompt, response) in enumerate(zip(prompts, c.responses, strict=True)):
                rec = {"model": c.name, "prompt": prompt, "response": response,
                       "reward": c.rewards[i] if c.rewards else None, "judge": c.judge[i] if c.judge else None,
                       "kl": c.kl[i] if c.kl else None}
                fh.write(json.dumps(rec) + "\n")
    plot(result, out / "eval.png")
    log.info("eval: wrote %s, responses.jsonl and eval.png", out / "eval.json")


def plot(result: dict, out_png: Path) -> Path:
    """Left: score (reward, else judge) versus KL to the reference, one point per model. Then one bar panel
    per score (reward model, gold judge), each on its own scale, with standard-error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["models"]
    metrics = [k for k in ("reward", "judge") if any(r[k] is not None for r in rows)]
    y_key = metrics[0] if metrics else "length"
    shown = metrics or ["length"]
    fig, axes = plt.subplots(1, 1 + len(shown), figsize=(4.2 * (1 + len(shown)), 3.8))
    ax1 = axes[0]
    points: dict[tuple[float, float], list[str]] = {}  # models at the same point share one label
    for r in rows:
        if r["kl"] is not None and r[y_key] is not None:
            points.setdefault((r["kl"], r[y_key]), []).append(r["model"])
    for (x, y), names in points.items():
        ax1.scatter(x, y)
        ax1.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    labels = {"reward": "reward-model score", "judge": "gold-judge score", "length": "length (tokens)"}
    ax1.set_xlabel(f"KL to reference ({result['baseline']}), nats per response")
    ax1.set_ylabel(labels[y_key])
    ax1.set_title(f"{labels[y_key]} vs KL", fontsize=9)
    ax1.grid(alpha=0.3)
    names = [r["model"] for r in rows]
    for ax, key in zip(axes[1:], shown, strict=True):
        values = [r[key] if r[key] is not None else math.nan for r in rows]
        errors = [r.get(f"{key}_se") or 0.0 for r in rows]
        ax.bar(range(len(rows)), values, 0.6, yerr=errors, capsize=4, color=f"C{shown.index(key)}")
        ax.set_xticks(range(len(rows)), names, fontsize=8)
        ax.set_title(f"mean {labels[key]} (+- 1 SE)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"rlhf eval: {result['prompts']} held-out prompts", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
