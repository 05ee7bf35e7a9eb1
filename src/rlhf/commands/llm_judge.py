"""`rlhf data synth --method judge --judge-model M`: preference labels from a local model used as a judge
(AI feedback, Bai et al. 2022; on the position bias of model judges, Zheng et al. 2023,
https://arxiv.org/abs/2306.05685).

The policy samples k responses per prompt (k=2 by default). Every two distinct finished samples x, y of
a prompt go to the judge twice, as (A=x, B=y) and as (A=y, B=x), in a template that asks which response
is better (`--judge-template FILE` with `{prompt}`, `{response_a}` and `{response_b}`, else
`DEFAULT_TEMPLATE`). The verdict is read from the judge's next-token distribution right after its chat
prompt, not from generated text: p = P("A") / (P("A") + P("B")). x is chosen when both orders prefer it
(p > 1/2 with x as A, p < 1/2 with y as A), y when both prefer y; a pair whose orders disagree (the judge
follows the position, or has no preference) is dropped and counted. The margin is the chosen side's
probability minus the other's, averaged over both orders: |p_xy - p_yx|, in [0, 1]; it is kept as the
pair's `margin` (the reward stage's Bradley-Terry margin with `reward.margin: true`).

`--pairs best-worst` (default) keeps the consistent pair with the largest margin per prompt, `all` every
consistent pair; `--min-gap` drops pairs whose margin is not above it. Both act on the judged log, so a
re-run with other values judges nothing again. The SFT set is the chosen side of each training prompt's
largest-margin pair.

Outputs in `--out`, next to those of every method (`synth.write_sets`): `judge.jsonl`, one line per prompt
with its samples and both probabilities of every judged pair (the log a re-run resumes from), and
`manifest.json` with the counts, the judge's mean label mass P("A") + P("B") (how much of its next-token
probability went to a label at all), the length bias of the pairs (`rlhf.verbosity`) and, with
`--gold-judge`, how often a program judge agrees with the kept pairs, with single-order verdicts and
with the sign of the difference between the two orders' probabilities.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlhf.commands import synth
from rlhf.commands.evaluation import load_judge
from rlhf.commands.synth import ModelPair, SynthSettings, user
from rlhf.errors import ConfigError, ModelError
from rlhf.resumable import run_chunks

log = logging.getLogger("rlhf")
LABELS = ("A", "B")
PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")
DEFAULT_TEMPLATE = """Here is a request and two responses to it.

Request: {prompt}

Response A: {response_a}

Response B: {response_b}

Which response is better? Answer with one letter, A or B."""
UNCUT = 1 << 20  # judge chats are never cut: each holds the request and both responses


def load_template(path: str | None) -> str:
    """The judge template of a text file (it must hold every placeholder), or `DEFAULT_TEMPLATE`."""
    if path is None:
        return DEFAULT_TEMPLATE
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--judge-template {path}: cannot read it ({getattr(err, 'strerror', None) or err})"
                          ) from None
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise ConfigError(f"--judge-template {path}: lacks {', '.join(missing)}; the template needs "
                          f"{', '.join(PLACEHOLDERS)}")
    return text


def judge_chat(template: str, prompt: str, a: str, b: str) -> list[dict]:
    """The judge's chat for one order (plain replacement: braces in the texts stay as they are)."""
    text = template.replace("{prompt}", prompt).replace("{response_a}", a).replace("{response_b}", b)
    return user(text)


def label_ids(tokenizer) -> tuple[int, int]:
    """Token ids of the two labels, each one token and different, or a ModelError."""
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in LABELS]
    if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
        raise ModelError(f"judge: the labels {LABELS} are not two distinct single tokens for this tokenizer "
                         f"({ids}); use another judge model")
    return ids[0][0], ids[1][0]


def label_probs(model, tokenizer, chats: list[list[dict]], batch_size: int) -> list[tuple[float, float]]:
    """(P("A") / (P("A") + P("B")), P("A") + P("B")) of the next token after each chat's generation prompt,
    in left-padded batches on the model's device."""
    import torch

    from rlhf.batching import encode_prompts, position_ids

    id_a, id_b = label_ids(tokenizer)
    out = []
    for start in range(0, len(chats), batch_size):
        ids, mask = encode_prompts(tokenizer, chats[start:start + batch_size], UNCUT, model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                           logits_to_keep=1).logits[:, -1].float()
        first = torch.sigmoid(logits[:, id_a] - logits[:, id_b])  # P(A) / (P(A) + P(B)), without underflow
        mass = logits.softmax(dim=-1)[:, [id_a, id_b]].sum(dim=-1)
        out += list(zip(first.tolist(), mass.tolist(), strict=True))
    return out


def candidate_pairs(samples: list[dict]) -> list[tuple[int, int]]:
    """(i, j), i < j, of every two distinct finished, non-empty samples (first occurrence of a text)."""
    keep: dict[str, int] = {}
    for i, smp in enumerate(samples):
        if smp["finished"] and smp["text"] and smp["text"] not in keep:
            keep[smp["text"]] = i
    idx = list(keep.values())
    return [(a, b) for n, a in enumerate(idx) for b in idx[n + 1:]]


def judge_prompts(m: ModelPair, prompts: list[str], s: SynthSettings, template: str,
                  max_prompt_length: int) -> list[dict]:
    """One record per prompt: its k samples and, per candidate pair (x, y), P("A") with x as A and with y
    as A (`p_a`) and the label masses of both orders."""
    label_ids(m.other_tok)  # a judge whose labels are not single tokens fails before any sampling
    config = synth.generation_config(m.policy_tok, s)
    flat = [user(p) for p in prompts for _ in range(s.k)]
    texts = synth.generate_texts(m.policy, m.policy_tok, flat, config, max_prompt_length, s.batch_size)
    records, chats = [], []
    for i, prompt in enumerate(prompts):
        samples = [{"text": t, "finished": f} for t, f in texts[i * s.k:(i + 1) * s.k]]
        pairs = [{"x": x, "y": y} for x, y in candidate_pairs(samples)]
        for pair in pairs:
            a, b = samples[pair["x"]]["text"], samples[pair["y"]]["text"]
            chats += [judge_chat(template, prompt, a, b), judge_chat(template, prompt, b, a)]
        records.append({"prompt": prompt, "samples": samples, "pairs": pairs})
    probs = iter(label_probs(m.other, m.other_tok, chats, s.batch_size))
    for pair in (p for r in records for p in r["pairs"]):
        (p_xy, mass_xy), (p_yx, mass_yx) = next(probs), next(probs)
        pair.update(p_a=[round(p_xy, 6), round(p_yx, 6)], mass=[round(mass_xy, 6), round(mass_yx, 6)])
    return records


def verdict(pair: dict) -> tuple[int, int, float] | None:
    """(chosen index, rejected index, margin) when both orders prefer the same sample, else None."""
    p_xy, p_yx = pair["p_a"]
    if p_xy > 0.5 and p_yx < 0.5:
        return pair["x"], pair["y"], p_xy - p_yx
    if p_xy < 0.5 and p_yx > 0.5:
        return pair["y"], pair["x"], p_yx - p_xy
    return None


def select(records: list[dict], pairs: str = "best-worst", min_gap: float = 0.0
           ) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(sft rows, preference rows, counts) of judged records (see the module docstring)."""
    sft, out = [], []
    counts = {"prompts_without_pair": 0, "pairs_judged": 0, "dropped_order_disagree": 0, "dropped_within_gap": 0}
    for r in records:
        counts["pairs_judged"] += len(r["pairs"])
        counts["prompts_without_pair"] += not r["pairs"]
        rows = []
        for pair in r["pairs"]:
            found = verdict(pair)
            if found is None:
                counts["dropped_order_disagree"] += 1
            elif found[2] <= min_gap:
                counts["dropped_within_gap"] += 1
            else:
                chosen, rejected, margin = found
                rows.append({"prompt": r["prompt"], "chosen": r["samples"][chosen]["text"],
                             "rejected": r["samples"][rejected]["text"], "margin": round(margin, 4),
                             "judge_p_a": pair["p_a"]})
        rows.sort(key=lambda row: -row["margin"])  # stable: equal margins keep the judging order
        if rows:
            sft.append({"prompt": r["prompt"], "completion": rows[0]["chosen"], "margin": rows[0]["margin"]})
        out += rows if pairs == "all" else rows[:1]
    return sft, out, counts


def judged_agreement(spec: str, records: list[dict]) -> dict[str, Any]:
    """Over every judged pair the program judge `spec` does not score equal: the share of single-order
    verdicts that agree with it (what judging in one order only would give), and the share where the sign
    of p_xy - p_yx does (the judge's preference with its position bias subtracted, kept pair or not)."""
    judge_fn = load_judge(spec, "--gold-judge")
    single = difference = total = 0
    for r in records:
        scores = judge_fn([user(r["prompt"])] * len(r["samples"]), [smp["text"] for smp in r["samples"]])
        for pair in r["pairs"]:
            if scores[pair["x"]] == scores[pair["y"]]:
                continue
            gold_x = scores[pair["x"]] > scores[pair["y"]]
            p_xy, p_yx = pair["p_a"]
            single += ((p_xy > 0.5) == gold_x) + ((p_yx < 0.5) == gold_x)
            difference += (p_xy > p_yx) == gold_x
            total += 1
    return {"judged_pairs": total,
            "single_order_agreement": round(single / (2 * total), 4) if total else None,
            "difference_agreement": round(difference / total, 4) if total else None}


def _no_pairs_reason(cfg, s: SynthSettings, records: list[dict], counts: dict[str, int]) -> str:
    """Why the judged training prompts gave no pair, for a warning."""
    finished = sum(smp["finished"] for r in records for smp in r["samples"])
    if not finished or not counts["pairs_judged"]:
        return synth.no_pairs_reason(cfg, s, sum(len(r["samples"]) for r in records), finished)
    return (f"of the {counts['pairs_judged']} pairs judged, the judge's two orders disagreed on "
            f"{counts['dropped_order_disagree']} and {counts['dropped_within_gap']} were within --min-gap "
            f"{s.min_gap}; use another --judge-model, or lower --min-gap")


def run_judge(cfg, out_dir: str | Path, *, judge_model: str, template_file: str | None = None,
              settings: SynthSettings | None = None, gold_judge: str | None = None, n_prompts: int | None = None,
              n_eval_prompts: int | None = None, prompts_file: str | None = None, command: str = "") -> dict[str, Any]:
    """Sample and judge (resumable), then select, write the sets and the manifest; returns the manifest."""
    s = settings or SynthSettings(k=2)
    template = load_template(template_file)
    load_judge(gold_judge, "--gold-judge")  # an unimportable gold judge fails before any model loads
    out = Path(out_dir)
    train, held = synth.distinct_split(cfg, s.seed, prompts_file, n_prompts, n_eval_prompts)
    started = time.time()
    models = synth.lazy_pair(cfg, judge_model)
    fingerprint = {"method": "judge", **synth.sampling_settings(cfg, s), "judge_model": judge_model,
                   "template": template}
    records = run_chunks(out, "judge", train + held,
                         lambda chunk: judge_prompts(models(), chunk, s, template, cfg.data.max_prompt_length),
                         settings=fingerprint, chunk_size=max(1, s.batch_size // s.k), seed=s.seed,
                         progress=cfg.logging.progress)
    sft, pairs, counts = select(records[:len(train)], s.pairs, s.min_gap)
    _, eval_pairs, eval_counts = select(records[len(train):], s.pairs, s.min_gap)
    synth.write_sets(out, train, held, sft, pairs, eval_pairs)
    if train and not pairs:
        log.warning("synth: no preference pairs: %s", _no_pairs_reason(cfg, s, records[:len(train)], counts))
    masses = [m for r in records for p in r["pairs"] for m in p["mass"]]
    gold = None
    if gold_judge is not None:  # reported even when no pair was kept: the single orders still tell
        gold = {**(synth.gold_report(gold_judge, pairs + eval_pairs) or {"judge": gold_judge, "pairs": 0}),
                **judged_agreement(gold_judge, records)}
    manifest = {"command": command, "method": "judge", "model": cfg.model.name_or_path,
                "chat_template": cfg.model.chat_template, "judge_model": judge_model,
                "template_file": template_file, "template": template, "settings": asdict(s),
                "prompts_source": prompts_file or "built-in quickstart prompts",
                "counts": {"train_prompts": len(train), "eval_prompts": len(held),
                           "samples": sum(len(r["samples"]) for r in records),
                           "finished_samples": sum(smp["finished"] for r in records for smp in r["samples"]),
                           "sft": len(sft), "preference": len(pairs), "preference_eval": len(eval_pairs),
                           "train": counts, "eval": eval_counts},
                "judge_label_mass": round(sum(masses) / len(masses), 4) if masses else None,
                "verbosity": synth.length_report(pairs), "gold": gold, "seconds": round(time.time() - started, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("synth: %d prompts judged; %d pairs, %d held-out pairs kept; %d of %d pairs dropped for "
             "disagreeing orders -> %s", len(records), len(pairs), len(eval_pairs),
             counts["dropped_order_disagree"] + eval_counts["dropped_order_disagree"],
             counts["pairs_judged"] + eval_counts["pairs_judged"], out)
    return manifest
