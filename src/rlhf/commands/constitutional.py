"""`rlhf data synth --method constitutional`: critique-and-revise preference pairs (Bai et al. 2022,
"Constitutional AI", https://arxiv.org/abs/2212.08073, section 3).

For every prompt the model samples a response (the first of `k` samples that ends with EOS after some
text). A critic (the
same model, or `--critic-model`) is shown the exchange followed by one principle's critique request, as a
chat, and writes a critique; shown that too and the principle's revision request, it writes a revision.
The pair is (prompt, chosen = revision, rejected = original); the principle's name and the critique stay in
the row for inspection. Each prompt gets one principle, picked by a seeded hash of the prompt, so a
resumed run picks the same one.

Dropped and counted: prompts none of whose k samples ended with EOS after some text
(`no_finished_original`: a cut-off rejected side would teach that "finished" means "good"), and revisions that are empty, identical to the
original (whitespace aside) or cut off at `max_new_tokens`. A cut-off critique is kept (counted): it is
only the critic's notes. The training pairs' revisions are also the SFT set (the supervised stage of
Constitutional AI).

Principles file (YAML):

    principles:
      - name: upbeat
        critique: Point out anything gloomy or negative in your last reply.
        revision: Rewrite your reply to be warm and upbeat. Reply with the new text only.

Outputs in `--out`, next to those of every method (`synth.write_sets`): `constitutional.jsonl`, one line
per prompt with every step (the log a re-run resumes from), and `manifest.json` with the counts, the
length bias of the pairs (`rlhf.verbosity`; revisions asked to be shorter make chosen the shorter side)
and, with `--gold-judge`, how often a program judge prefers the revision.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf.commands import synth
from rlhf.commands.evaluation import load_judge
from rlhf.commands.synth import ModelPair, SynthSettings, user
from rlhf.errors import ConfigError
from rlhf.resumable import run_chunks

log = logging.getLogger("rlhf")
DROP_REASONS = ("no_finished_original", "revision_empty", "revision_identical", "revision_cut_off")
UNCUT = 1 << 20  # critic chats are never cut: each holds a whole exchange
QUOTES = ('"', "'", "\u201c", "\u201d")


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    """What the critic is asked to point out in the response."""
    revision: str
    """How the critic is asked to rewrite the response."""


def load_principles(path: str | Path) -> list[Principle]:
    """The principles of a YAML file (`principles:` list of {name, critique, revision}); errors name the entry."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        why = getattr(err, "strerror", None) or " ".join(str(err).split())  # a YAML error on one line
        raise ConfigError(f"--principles {path}: cannot read it ({why})") from None
    entries = raw.get("principles") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"--principles {path}: expected a non-empty `principles:` list of "
                          "{name, critique, revision}")
    out = []
    for i, entry in enumerate(entries, 1):
        keys = set(entry) if isinstance(entry, dict) else set()
        texts = [entry.get(k) for k in ("critique", "revision")] if keys else []
        if keys - {"name", "critique", "revision"} or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigError(f"--principles {path}: principle {i} needs non-empty `critique` and `revision` "
                              f"texts (and an optional `name`), got {entry!r}")
        out.append(Principle(str(entry.get("name") or f"principle-{i}"), *(t.strip() for t in texts)))
    if len({p.name for p in out}) < len(out):
        raise ConfigError(f"--principles {path}: principle names must differ")
    return out


def pick(principles: list[Principle], prompt: str, seed: int) -> Principle:
    """The principle for a prompt: fixed by the prompt and seed, spread evenly over many prompts."""
    return principles[zlib.crc32(f"{seed}\n{prompt}".encode()) % len(principles)]


def clean_revision(text: str) -> str:
    """The revision without surrounding whitespace and the quotes small models like to wrap it in."""
    text = text.strip()
    if len(text) >= 2 and text[0] in QUOTES and text[-1] in QUOTES and not any(q in text[1:-1] for q in QUOTES):
        text = text[1:-1].strip()
    return text


def _same(a: str, b: str) -> bool:
    return a.split() == b.split()


def critique_and_revise(m: ModelPair, prompts: list[str], principles: list[Principle], s: SynthSettings,
                        critique_tokens: int, max_prompt_length: int) -> list[dict]:
    """One record per prompt: its original, principle, critique and revision, and `dropped` (a reason of
    `DROP_REASONS`, or None for a kept pair)."""
    config = synth.generation_config(m.policy_tok, s)
    flat = [user(p) for p in prompts for _ in range(s.k)]
    samples = synth.generate_texts(m.policy, m.policy_tok, flat, config, max_prompt_length, s.batch_size)
    records = []
    for i, prompt in enumerate(prompts):
        group = samples[i * s.k:(i + 1) * s.k]
        usable = next((smp for smp in group if smp[1] and smp[0]), None)
        text, finished = usable or group[0]
        records.append({"prompt": prompt, "principle": pick(principles, prompt, s.seed).name, "original": text,
                        "original_finished": finished, "critique": None, "critique_finished": None,
                        "revision": None, "revision_finished": None,
                        "dropped": None if usable else "no_finished_original"})
    todo = [r for r in records if r["dropped"] is None]
    by_name = {p.name: p for p in principles}
    chats = [user(r["prompt"]) + [{"role": "assistant", "content": r["original"]}]
             + user(by_name[r["principle"]].critique) for r in todo]
    critiques = synth.generate_texts(m.other, m.other_tok, chats, synth.generation_config(
        m.other_tok, s, critique_tokens), UNCUT, s.batch_size)
    chats = [chat + [{"role": "assistant", "content": c}] + user(by_name[r["principle"]].revision)
             for chat, (c, _), r in zip(chats, critiques, todo, strict=True)]
    revisions = synth.generate_texts(m.other, m.other_tok, chats, synth.generation_config(m.other_tok, s),
                                     UNCUT, s.batch_size)
    for r, (critique, c_done), (revision, r_done) in zip(todo, critiques, revisions, strict=True):
        revision = clean_revision(revision)
        r.update(critique=critique, critique_finished=c_done, revision=revision, revision_finished=r_done)
        r["dropped"] = ("revision_cut_off" if not r_done else "revision_empty" if not revision
                        else "revision_identical" if _same(revision, r["original"]) else None)
    return records


def build_sets(records: list[dict], n_train: int) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(sft rows, training pairs, held-out pairs, counts) from the records of the training prompts (the
    first `n_train`) and the held-out ones."""
    def pairs(rows: list[dict]) -> list[dict]:
        return [{"prompt": r["prompt"], "chosen": r["revision"], "rejected": r["original"],
                 "principle": r["principle"], "critique": r["critique"]} for r in rows if r["dropped"] is None]

    train, held = pairs(records[:n_train]), pairs(records[n_train:])
    sft = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train]
    counts: dict[str, Any] = {"prompts": len(records), "pairs": len(train), "pairs_eval": len(held),
                              "dropped": {k: sum(r["dropped"] == k for r in records) for k in DROP_REASONS},
                              "critique_cut_off": sum(r["critique_finished"] is False for r in records),
                              "by_principle": {}}
    for r in records:
        kept = counts["by_principle"].setdefault(r["principle"], {"prompts": 0, "pairs": 0})
        kept["prompts"] += 1
        kept["pairs"] += r["dropped"] is None
    return sft, train, held, counts


def run_constitutional(cfg, out_dir: str | Path, *, principles_file: str, critic_model: str | None = None,
                       settings: SynthSettings | None = None, critique_tokens: int = 64,
                       gold_judge: str | None = None, n_prompts: int | None = None,
                       n_eval_prompts: int | None = None, prompts_file: str | None = None,
                       command: str = "") -> dict[str, Any]:
    """Sample, critique, revise (resumable), then write the sets and the manifest; returns the manifest."""
    s = settings or SynthSettings(k=1)
    principles = load_principles(principles_file)
    load_judge(gold_judge)  # an unimportable gold judge fails before any model loads
    out = Path(out_dir)
    train, held = synth.distinct_split(cfg, s.seed, prompts_file, n_prompts, n_eval_prompts)
    started = time.time()
    models = synth.lazy_pair(cfg, critic_model)
    fingerprint = {"method": "constitutional", **synth.sampling_settings(cfg, s), "critic_model": critic_model,
                   "principles": [asdict(p) for p in principles], "critique_max_new_tokens": critique_tokens}
    records = run_chunks(out, "constitutional", train + held,
                         lambda chunk: critique_and_revise(models(), chunk, principles, s, critique_tokens,
                                                           cfg.data.max_prompt_length),
                         settings=fingerprint, chunk_size=max(1, s.batch_size // s.k), seed=s.seed,
                         progress=cfg.logging.progress)
    sft, pairs, eval_pairs, counts = build_sets(records, len(train))
    synth.write_sets(out, train, held, sft, pairs, eval_pairs)
    manifest = {"command": command, "method": "constitutional", "model": cfg.model.name_or_path,
                "chat_template": cfg.model.chat_template, "critic_model": critic_model or cfg.model.name_or_path,
                "principles_file": str(principles_file), "principles": [asdict(p) for p in principles],
                "settings": {**asdict(s), "critique_max_new_tokens": critique_tokens},
                "prompts_source": prompts_file or "built-in quickstart prompts",
                "counts": {"train_prompts": len(train), "eval_prompts": len(held), **counts},
                "verbosity": synth.length_report(pairs), "gold": synth.gold_report(gold_judge, pairs + eval_pairs),
                "seconds": round(time.time() - started, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("synth: %d prompts; %d pairs, %d held-out pairs kept; dropped %s -> %s", len(records), len(pairs),
             len(eval_pairs), counts["dropped"], out)
    return manifest
