"""`rlhf data synth`: SFT and preference sets from the base model's own samples, labeled by a judge.

Three methods: `program` (below: k samples ranked by a program), `constitutional` (critique-and-revise
pairs, `rlhf.commands.constitutional`) and `judge` (pairs labeled by a local model, `rlhf.commands.llm_judge`). This module
holds the program method and what the three share: prompts, batched generation, the output files.

For every prompt the base model samples k responses; a judge (`module:function(prompts, responses)`,
e.g. `rlhf.judges:positivity`) scores them. The best and the worst of the k become a chosen/rejected
pair (`--pairs all`: every two of them; pairs whose scores are within `min_gap` are skipped: they carry
no preference), and the best response of each training prompt becomes an SFT example.
`--from-samples` re-judges and re-selects the samples of an earlier run instead of sampling again. This is best-of-k rejection
sampling for SFT plus AI-feedback preference labels (Bai et al. 2022, "Constitutional AI"; here the
feedback is a program, so the gold judge of the quickstart stays independent of the reward model).

Only responses that end with EOS within `max_new_tokens` are used: a cut-off reply would teach SFT to
stop mid-sentence and the reward model that "finished" means "good".

Prompts are the built-in quickstart prompts (question templates x everyday topics, split by topic so
that held-out prompts name topics never seen in training) or a prompt file. Outputs in `--out`:

  prompts.jsonl, prompts_eval.jsonl     training / held-out prompts ({"prompt"})
  sft.jsonl                             best response per training prompt ({"prompt", "completion", "score"})
  preference.jsonl                      pairs of training prompts ({"prompt", "chosen", "rejected", ...})
  preference_eval.jsonl                 the same on held-out prompts (reward-model accuracy on unseen topics)
  samples.jsonl                         every sample with its judge score and whether it finished
  manifest.json                         the command, model, judge, generation settings and counts
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rlhf")

DEFAULT_JUDGE = "rlhf.judges:positivity"

# Each asks for one short sentence so that replies fit in ~32 tokens on a 2-core CPU.
TEMPLATES = (
    "Write one short sentence about {}.",
    "In one sentence, how do you feel about {}?",
    "Describe {} in one short sentence.",
    "Give a one-sentence opinion on {}.",
)
# Everyday topics, many of them ones people grumble about, so that a small instruct model's replies
# range from negative to positive and there is room to become more upbeat.
TOPICS = (
    "Monday mornings", "rainy weather", "traffic jams", "a cup of coffee", "public libraries", "homework",
    "waiting in line", "the dentist", "winter", "city buses", "spreadsheets", "cats", "airports",
    "doing laundry", "old smartphones", "math exams", "alarm clocks", "tax forms", "crowded trains",
    "spam emails", "cold soup", "flat tires", "long meetings", "software updates", "noisy neighbors",
    "mosquitoes", "job interviews", "power outages", "paperwork", "hospital food", "group projects",
    "parking tickets", "slow internet", "burnt toast", "lost luggage", "dirty dishes", "tight shoes",
    "rush hour", "cleaning the bathroom", "public speaking", "jet lag", "a broken umbrella", "snoring",
    "unexpected bills", "standardized tests", "a stuck zipper", "gym memberships", "self-checkout machines",
    "hiccups", "customer service calls", "a dead phone battery", "a sunburn", "cold showers",
    "a leaky faucet", "reply-all emails", "pop-up ads", "grocery shopping", "vegetables", "running",
    "the weekend", "birthday parties", "a new job", "moving house", "camping", "gardening", "teenagers",
    "old movies", "board games", "the ocean", "mountains", "museums", "rain boots", "homemade bread",
    "a quiet evening", "dogs", "bicycles", "learning a language", "chess", "the library card",
    "snowstorms", "thunderstorms", "fog", "summer heat", "autumn leaves", "spring cleaning", "the news",
    "social media", "video calls", "online shopping", "cooking dinner", "washing the car", "elevators",
    "escalators", "office chairs", "printers", "passwords", "robocalls", "instruction manuals",
    "waiting rooms", "road construction", "bus stops", "train delays", "potholes", "speed bumps",
    "traffic lights", "street noise", "car alarms", "pigeons", "spiders", "wasps", "weeds", "mud",
    "dust", "rainy weekends", "early flights", "red-eye flights", "hotel breakfasts", "small talk",
    "queues at the bank", "overdue library books", "expired coupons", "decaf coffee", "tofu",
    "brussels sprouts", "leftovers", "diet soda", "instant noodles",
)
N_EVAL_TOPICS = 25


def quickstart_prompts(seed: int = 0, n_eval_topics: int = N_EVAL_TOPICS) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: every template x topic, split by topic (held-out topics are unseen)."""
    topics = sorted(set(TOPICS))
    random.Random(seed).shuffle(topics)
    eval_topics, train_topics = topics[:n_eval_topics], topics[n_eval_topics:]

    def expand(names: list[str]) -> list[str]:
        return [t.format(name) for name in names for t in TEMPLATES]

    return expand(train_topics), expand(eval_topics)


# ------------------------------------------------------------------------------------------ sampling


@dataclass
class SynthSettings:
    k: int = 4
    """Samples per prompt."""
    max_new_tokens: int = 48
    """Sample length limit; samples that do not end with EOS within it are not used."""
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64
    """Sequences per generate() call (prompts x k); large batches amortize per-token overhead on CPU."""
    min_gap: float = 0.0
    """Pairs need chosen - rejected score > min_gap."""
    pairs: str = "best-worst"
    """`best-worst`: one pair per prompt; `all`: every two distinct finished samples of a prompt whose
    scores differ by more than min_gap (up to k(k-1)/2 pairs per prompt from the same samples)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pairs not in ("best-worst", "all"):
            raise ValueError(f"pairs must be 'best-worst' or 'all', not {self.pairs!r}")


@dataclass
class Sample:
    prompt: str
    text: str
    finished: bool
    score: float = 0.0


def generation_config(tokenizer, s: SynthSettings, max_new_tokens: int | None = None):
    """Sampling with `s`'s settings, as a complete GenerationConfig (`rlhf.generation.hf_config`)."""
    from rlhf.generation import Sampling, hf_config

    sampling = Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    return hf_config(tokenizer, sampling, max_new_tokens or s.max_new_tokens)


def generate_texts(model, tokenizer, chats: list[list[dict]], config, max_prompt_length: int,
                   batch_size: int) -> list[tuple[str, bool]]:
    """(reply, finished) per chat: left-padded batches of `batch_size` sampled on the model's device with
    `rlhf.generation.sample` under `config`. A reply ends at its first EOS (`finished`), or is whatever
    `config.max_new_tokens` allowed; decoded without special tokens, stripped."""
    from rlhf.batching import encode_prompts
    from rlhf.generation import sample

    out = []
    for start in range(0, len(chats), batch_size):
        ids, mask = encode_prompts(tokenizer, chats[start:start + batch_size], max_prompt_length, model.device)
        got = sample(model, tokenizer, ids, mask, config)
        out += [(text.strip(), bool(done)) for text, done in zip(got.texts, got.has_eos.tolist(), strict=True)]
    return out


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def sample_responses(model, tokenizer, prompts: list[str], s: SynthSettings, max_prompt_length: int = 256,
                     progress: bool = True) -> list[Sample]:
    """k samples per prompt (prompt i's samples are at i*k .. i*k+k-1), batched, with a progress bar."""
    import torch
    from tqdm.auto import tqdm

    config = generation_config(tokenizer, s)
    torch.manual_seed(s.seed)
    flat = [p for p in prompts for _ in range(s.k)]
    out: list[Sample] = []
    bar = tqdm(total=len(flat), desc="synth: sampling", unit="sample", disable=not progress)
    for start in range(0, len(flat), s.batch_size):
        batch = flat[start:start + s.batch_size]
        texts = generate_texts(model, tokenizer, [user(p) for p in batch], config, max_prompt_length, s.batch_size)
        out += [Sample(prompt, text, finished) for prompt, (text, finished) in zip(batch, texts, strict=True)]
        bar.update(len(batch))
    bar.close()
    return out


def select(samples: list[Sample], k: int, min_gap: float = 0.0, pairs: str = "best-worst",
           ) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(sft rows, preference rows, skip counts) from scored samples grouped k per prompt.

    Per prompt: unfinished and empty samples are dropped, duplicates of a text kept once. The best sample
    is the SFT completion. `pairs="best-worst"`: best vs worst is a pair when their scores differ by more
    than `min_gap`; `pairs="all"`: every two samples whose scores differ by more than `min_gap`, in
    sampling order. Ties in score are broken by order (the first sampled wins), so the result is
    deterministic.
    """
    sft, out = [], []
    skipped = {"no_finished": 0, "one_distinct": 0, "within_gap": 0}
    for start in range(0, len(samples), k):
        group, seen = [], set()
        for smp in samples[start:start + k]:
            if smp.finished and smp.text and smp.text not in seen:
                seen.add(smp.text)
                group.append(smp)
        if not group:
            skipped["no_finished"] += 1
            continue
        best = max(group, key=lambda x: x.score)
        sft.append({"prompt": best.prompt, "completion": best.text, "score": round(best.score, 4)})
        if len(group) < 2:
            skipped["one_distinct"] += 1
            continue
        if pairs == "all":
            candidates = [(a, b) if a.score >= b.score else (b, a)
                          for i, a in enumerate(group) for b in group[i + 1:]]
        else:
            candidates = [(best, min(group, key=lambda x: x.score))]
        kept = [(hi, lo) for hi, lo in candidates if hi.score - lo.score > min_gap]
        if not kept:
            skipped["within_gap"] += 1
        for hi, lo in kept:
            out.append({"prompt": hi.prompt, "chosen": hi.text, "rejected": lo.text,
                        "chosen_score": round(hi.score, 4), "rejected_score": round(lo.score, 4),
                        "margin": round(hi.score - lo.score, 4)})
    return sft, out, skipped


def load_samples(path: str | Path) -> tuple[list[Sample], list[Sample], int]:
    """(train samples, held-out samples, k) of a `samples.jsonl` written by an earlier run."""
    from rlhf.errors import DataError

    train: list[Sample] = []
    held: list[Sample] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err}); pass the "
                        "samples.jsonl of an earlier `rlhf data synth` run") from None
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            smp = Sample(str(row["prompt"]), str(row["text"]), bool(row["finished"]))
            (train if row["split"] == "train" else held).append(smp)
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}:{i}: not a samples.jsonl row of `rlhf data synth` ({err})") from err
    both = train + held
    k = next((i for i, smp in enumerate(both) if smp.prompt != both[0].prompt), len(both)) if both else 0
    if not k or len(train) % k or len(held) % k or any(both[j].prompt != both[j - j % k].prompt
                                                       for j in range(len(both))):
        raise DataError(f"{path}: samples are not in groups of the same size per prompt; regenerate it "
                        "with `rlhf data synth`")
    return train, held, k


# ---------------------------------------------------------------------------------------------- run


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _read_prompts(path: str, eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Plain-string single-turn prompts of a prompt file, split into train / held-out."""
    from rlhf import data
    from rlhf.data import split_rows
    from rlhf.errors import DataError

    rows = data.load(path, "prompt").rows
    prompts = []
    for i, row in enumerate(rows):
        msgs = row["prompt"]
        if len(msgs) != 1 or msgs[0]["role"] != "user":
            raise DataError(f"{path}: row {i + 1}: synth takes single-turn user prompts")
        prompts.append(msgs[0]["content"])
    train, held = split_rows([{"p": p} for p in prompts], eval_fraction, seed)
    return [r["p"] for r in train], [r["p"] for r in held]


def no_pairs_reason(cfg, s: SynthSettings, n_samples: int, n_finished: int) -> str:
    """Why a synth run made no training pair, for a warning (the sets are written all the same)."""
    if n_finished == 0:
        return (f"none of the {n_samples} samples ended with EOS within --max-new-tokens {s.max_new_tokens}, and "
                f"unfinished ones are not used; the samples come from model.name_or_path ({cfg.model.name_or_path}"
                f", {cfg.source}): set it to a model that answers (a random model such as tiny-random almost "
                "never ends a reply), or raise --max-new-tokens")
    return (f"{n_finished} of the {n_samples} samples finished, but no prompt had two distinct finished samples "
            f"the judge scores more than --min-gap {s.min_gap} apart; raise --k or --max-new-tokens, or lower "
            "--min-gap")


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def split_prompts(cfg, seed: int, prompts_file: str | None, n_prompts: int | None,
                  n_eval_prompts: int | None) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: the prompt file's, else the built-in quickstart prompts; the first
    `n_prompts` / `n_eval_prompts` of each when given (0 takes none; more than there are: all, with a
    warning that says why there are fewer)."""
    if prompts_file:
        fraction = cfg.data.eval_fraction or 0.2
        train, held = _read_prompts(prompts_file, fraction, seed)
        where = (f"{prompts_file} holds {len(train) + len(held)}, of which {len(held)} are held out by "
                 f"data.eval_fraction {fraction}")
    else:
        train, held = quickstart_prompts(seed)
        where = "the built-in quickstart prompts"
    for flag, wanted, have, split in (("--n-prompts", n_prompts, train, "training"),
                                      ("--n-eval-prompts", n_eval_prompts, held, "held-out")):
        if wanted is not None and wanted > len(have):
            log.warning("%s %d: there are %d %s prompts (%s); using those %d", flag, wanted, len(have), split,
                        where, len(have))
    return (train if n_prompts is None else train[:n_prompts],
            held if n_eval_prompts is None else held[:n_eval_prompts])


def sampling_settings(cfg, s) -> dict[str, Any]:
    """The settings every resumable method's samples depend on (`resumable.check_settings` compares them)."""
    return {"model": cfg.model.name_or_path, "chat_template": cfg.model.chat_template, "k": s.k,
            "max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
            "seed": s.seed}


def distinct_split(cfg, seed: int, prompts_file: str | None, n_prompts: int | None,
                   n_eval_prompts: int | None) -> tuple[list[str], list[str]]:
    """`split_prompts` with repeats removed, and no held-out prompt that is also a training prompt (the
    resumable methods key their logs by prompt)."""
    train, held = split_prompts(cfg, seed, prompts_file, n_prompts, n_eval_prompts)
    seen = set(train)
    return list(dict.fromkeys(train)), [p for p in dict.fromkeys(held) if p not in seen]


def load_generator(cfg, device, name: str | None = None):
    """(model, left-padding tokenizer) on `device` (the run's device, `engine.usable_device`, decided once
    by the caller) in the run's dtype, in eval mode: the config's model with its `chat_template`, or the
    model `name` with its own template."""
    from rlhf import engine, models

    if name is None:
        path = models.resolve_model(cfg.model.name_or_path)
        tok_path = models.resolve_model(cfg.model.tokenizer) if cfg.model.tokenizer else path
        tokenizer = models.load_tokenizer(tok_path, chat_template=cfg.model.chat_template, padding_side="left")
    else:
        path = models.resolve_model(name)
        tokenizer = models.load_tokenizer(path, padding_side="left")
    model = models.load_causal_lm(path, tokenizer=tokenizer, dtype=engine.run_dtype(cfg, device))
    return model.to(device).eval(), tokenizer


@dataclass
class ModelPair:
    """The policy (samples responses) and the model that critiques or judges them, often the same one."""

    policy: Any
    policy_tok: Any
    other: Any
    other_tok: Any


def load_pair(cfg, other: str | None) -> ModelPair:
    """The config's model and `other` (a critic or judge), each with its tokenizer; `other` is the policy
    itself (same objects, the config's chat template) when None or when it names the same model."""
    from rlhf import engine, models

    device = engine.usable_device(cfg.run.device, source=cfg.source)  # one decision for both models
    policy, policy_tok = load_generator(cfg, device)
    if other is None or models.resolve_model(other) == models.resolve_model(cfg.model.name_or_path):
        return ModelPair(policy, policy_tok, policy, policy_tok)
    return ModelPair(policy, policy_tok, *load_generator(cfg, device, other))


def lazy_pair(cfg, other: str | None) -> Callable[[], ModelPair]:
    """`load_pair` on the first call, the same objects after it: a re-run with nothing left to do loads no
    model."""
    return functools.cache(lambda: load_pair(cfg, other))


def length_report(pairs: list[dict]) -> dict | None:
    """Length bias of `{"chosen", "rejected", "margin"?}` rows in words (`rlhf.verbosity`), with its
    warnings, for a manifest."""
    from rlhf import verbosity

    bias = verbosity.length_bias([verbosity.response_length(r["chosen"]) for r in pairs],
                                 [verbosity.response_length(r["rejected"]) for r in pairs],
                                 [r.get("margin") for r in pairs])
    return None if bias is None else {**asdict(bias), "warnings": verbosity.warnings(bias)}


def gold_report(spec: str | None, pairs: list[dict]) -> dict | None:
    """How often the program judge `spec` (`--gold-judge`) scores chosen above rejected over `pairs` (with
    the ties)."""
    from rlhf.commands.evaluation import load_judge

    judge_fn = load_judge(spec, "--gold-judge")
    if judge_fn is None or not pairs:
        return None
    prompts = [user(r["prompt"]) for r in pairs]
    chosen = judge_fn(prompts, [r["chosen"] for r in pairs])
    rejected = judge_fn(prompts, [r["rejected"] for r in pairs])
    both = list(zip(chosen, rejected, strict=True))
    n = len(both)
    return {"judge": spec, "pairs": n, "prefers_chosen": round(sum(c > r for c, r in both) / n, 4),
            "ties": round(sum(c == r for c, r in both) / n, 4),
            "prefers_rejected": round(sum(c < r for c, r in both) / n, 4),
            "mean_chosen": _mean(list(chosen)), "mean_rejected": _mean(list(rejected))}


def write_sets(out: Path, train: list[str], held: list[str], sft: list[dict], pairs: list[dict],
               eval_pairs: list[dict]) -> None:
    """The sets every method writes: prompts, SFT rows, preference pairs (training and held-out)."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "prompts.jsonl", [{"prompt": p} for p in train])
    write_jsonl(out / "prompts_eval.jsonl", [{"prompt": p} for p in held])
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "preference.jsonl", pairs)
    write_jsonl(out / "preference_eval.jsonl", eval_pairs)


def run_synth(cfg, out_dir: str | Path, *, settings: SynthSettings | None = None, judge: str = DEFAULT_JUDGE,
              n_prompts: int | None = None, n_eval_prompts: int | None = None, prompts_file: str | None = None,
              samples_file: str | None = None, command: str = "") -> dict[str, Any]:
    """Sample, judge, select and write the sets (see the module docstring). Returns the manifest."""
    from rlhf import engine
    from rlhf.commands.evaluation import load_judge

    s = settings or SynthSettings()
    judge_fn = load_judge(judge)
    started = time.time()
    if samples_file:  # re-judge and re-select earlier samples: no model, no sampling
        train_samples, held_samples, k = load_samples(samples_file)
        if k != s.k:
            log.info("synth: %s holds %d samples per prompt; using k=%d", samples_file, k, k)
            s.k = k
        samples = train_samples + held_samples
        train = list(dict.fromkeys(x.prompt for x in train_samples))
        held = list(dict.fromkeys(x.prompt for x in held_samples))
    else:
        train, held = split_prompts(cfg, s.seed, prompts_file, n_prompts, n_eval_prompts)
        model, tokenizer = load_generator(cfg, engine.usable_device(cfg.run.device, source=cfg.source))
        samples = sample_responses(model, tokenizer, train + held, s, cfg.data.max_prompt_length,
                                   progress=cfg.logging.progress)
    gen_seconds = time.time() - started
    scores = judge_fn([[{"role": "user", "content": x.prompt}] for x in samples], [x.text for x in samples])
    for smp, score in zip(samples, scores, strict=True):
        smp.score = float(score)
    n_train = len(train) * s.k
    sft, pairs, skipped = select(samples[:n_train], s.k, s.min_gap, s.pairs)
    _, eval_pairs, eval_skipped = select(samples[n_train:], s.k, s.min_gap, s.pairs)

    out = Path(out_dir)
    write_sets(out, train, held, sft, pairs, eval_pairs)
    write_jsonl(out / "samples.jsonl", [{**asdict(x), "score": round(x.score, 4), "split": "train" if i < n_train
                                          else "eval"} for i, x in enumerate(samples)])
    finished = [x.score for x in samples if x.finished]
    if train and not pairs:
        log.warning("synth: no preference pairs: %s", no_pairs_reason(cfg, s, n_train, sum(
            x.finished for x in samples[:n_train])))
    manifest = {
        "command": command, "method": "program", "model": cfg.model.name_or_path,
        "chat_template": cfg.model.chat_template, "judge": judge, "settings": asdict(s),
        "prompts_source": (f"samples of {samples_file}" if samples_file else prompts_file or "built-in quickstart prompts"),
        "counts": {"train_prompts": len(train), "eval_prompts": len(held), "samples": len(samples),
                   "finished_samples": len(finished), "sft": len(sft), "preference": len(pairs),
                   "preference_eval": len(eval_pairs), "skipped_train": skipped, "skipped_eval": eval_skipped},
        "judge_means": {"all_samples": _mean([x.score for x in samples]), "finished_samples": _mean(finished),
                        "sft_completions": _mean([r["score"] for r in sft]),
                        "chosen": _mean([r["chosen_score"] for r in pairs]),
                        "rejected": _mean([r["rejected_score"] for r in pairs])},
        "verbosity": length_report(pairs),
        "generation_seconds": round(gen_seconds, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("synth: %d prompts x %d samples in %.0f s; %d SFT rows, %d pairs, %d held-out pairs -> %s",
             len(train) + len(held), s.k, gen_seconds, len(sft), len(pairs), len(eval_pairs), out)
    return manifest
