"""rlhf.commands.synth: prompt split, best/worst-of-k selection, and an end-to-end run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.commands import synth
from rlhf.commands.synth import Sample, SynthSettings, quickstart_prompts, select
from rlhf.config import config_from_dict


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -------------------------------------------------------------------------------------------- prompts


def test_quickstart_prompts_split_by_topic_and_deterministic():
    train, held = quickstart_prompts(seed=0)
    assert (train, held) == quickstart_prompts(seed=0)
    assert len(held) == synth.N_EVAL_TOPICS * len(synth.TEMPLATES)
    assert len(train) + len(held) == len(synth.TOPICS) * len(synth.TEMPLATES)
    assert not set(train) & set(held)

    def topic(prompt: str) -> str:
        return next(t for t in synth.TOPICS if t in prompt and any(tpl.format(t) == prompt for tpl in synth.TEMPLATES))

    assert not {topic(p) for p in train} & {topic(p) for p in held}  # held-out topics are unseen
    assert quickstart_prompts(seed=1)[1] != held


# ------------------------------------------------------------------------------------------ selection


def _group(prompt: str, items: list[tuple[str, bool, float]]) -> list[Sample]:
    return [Sample(prompt, text, finished, score) for text, finished, score in items]


def test_select_best_and_worst_of_finished_samples():
    samples = _group("p1", [("ok", True, 0.1), ("great", True, 0.9), ("cut off", False, 1.0), ("bad", True, -0.5)])
    sft, pairs, skipped = select(samples, k=4)
    assert sft == [{"prompt": "p1", "completion": "great", "score": 0.9}]  # the unfinished 1.0 is not used
    assert pairs == [{"prompt": "p1", "chosen": "great", "rejected": "bad", "chosen_score": 0.9,
                      "rejected_score": -0.5, "margin": 1.4}]
    assert skipped == {"no_finished": 0, "one_distinct": 0, "within_gap": 0}


def test_select_skips_ties_duplicates_unfinished_and_small_gaps():
    samples = (_group("tie", [("a", True, 0.5), ("b", True, 0.5)])
               + _group("dup", [("same", True, 0.3), ("same", True, 0.3)])
               + _group("cut", [("x", False, 0.2), ("y", False, 0.8)])
               + _group("gap", [("u", True, 0.40), ("v", True, 0.45)]))
    sft, pairs, skipped = select(samples, k=2, min_gap=0.1)
    assert [r["prompt"] for r in sft] == ["tie", "dup", "gap"]
    assert sft[0]["completion"] == "a"  # a tie goes to the first sample
    assert pairs == []
    assert skipped == {"no_finished": 1, "one_distinct": 1, "within_gap": 2}


def test_select_all_pairs_of_a_prompt_above_the_gap():
    samples = _group("p", [("mid", True, 0.5), ("top", True, 0.9), ("low", True, 0.45), ("cut", False, 1.0)])
    sft, pairs, skipped = select(samples, k=4, min_gap=0.1, pairs="all")
    assert sft == [{"prompt": "p", "completion": "top", "score": 0.9}]
    # mid-low (0.05) is within the gap; the unfinished sample is in no pair
    assert [(r["chosen"], r["rejected"], r["margin"]) for r in pairs] == [("top", "mid", 0.4), ("top", "low", 0.45)]
    assert skipped == {"no_finished": 0, "one_distinct": 0, "within_gap": 0}
    _, best_worst, _ = select(samples, k=4, min_gap=0.1)
    assert [(r["chosen"], r["rejected"]) for r in best_worst] == [("top", "low")]


def test_load_samples_rejects_ragged_groups(tmp_path):
    from rlhf.errors import DataError

    path = tmp_path / "samples.jsonl"
    rows = [("a", "train"), ("a", "train"), ("b", "train"), ("c", "eval"), ("c", "eval")]
    path.write_text("".join(json.dumps({"prompt": p, "text": "t", "finished": True, "split": sp}) + "\n"
                            for p, sp in rows))
    with pytest.raises(DataError, match="samples.jsonl: samples are not in groups of the same size"):
        synth.load_samples(path)
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"samples.jsonl:1: not a samples.jsonl row"):
        synth.load_samples(path)


def test_cli_from_missing_samples_is_one_line_and_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("logging:\n  progress: false\n")
    out = tmp_path / "out"
    code = main(["data", "synth", "--config", str(cfg), "--out", str(out), "--from-samples", str(tmp_path / "no.jsonl")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and err == [f"error: {tmp_path / 'no.jsonl'}: cannot read it (No such file or directory); pass "
                                 "the samples.jsonl of an earlier `rlhf data synth` run"]
    assert not out.exists()


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture
def tiny_cfg(tiny_model_dir, tmp_path):
    return config_from_dict({"run": {"output_dir": str(tmp_path / "runs"), "seed": 0},
                             "model": {"name_or_path": str(tiny_model_dir)},
                             "data": {"max_length": 64, "max_prompt_length": 32},
                             "ppo": {"temperature": 1.0}, "logging": {"progress": False}})


def test_run_synth_on_tiny_model_writes_consistent_sets(tiny_cfg, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(10)))
    out = tmp_path / "out"
    settings = SynthSettings(k=3, max_new_tokens=6, temperature=1.0, batch_size=8, seed=0)
    manifest = synth.run_synth(tiny_cfg, out, settings=settings, prompts_file=str(prompts), command="rlhf data synth x")
    for name in ("prompts.jsonl", "prompts_eval.jsonl", "sft.jsonl", "preference.jsonl", "preference_eval.jsonl",
                 "samples.jsonl", "manifest.json"):
        assert (out / name).is_file(), name
    train, held = [r["prompt"] for r in _read(out / "prompts.jsonl")], [r["prompt"] for r in _read(out / "prompts_eval.jsonl")]
    assert len(train) + len(held) == 10 and held and not set(train) & set(held)
    samples = _read(out / "samples.jsonl")
    assert len(samples) == 3 * 10
    assert [s["split"] for s in samples] == ["train"] * 3 * len(train) + ["eval"] * 3 * len(held)
    finished = {(s["prompt"], s["text"]) for s in samples if s["finished"]}
    for row in _read(out / "sft.jsonl"):
        assert row["prompt"] in train and (row["prompt"], row["completion"]) in finished
    for row in _read(out / "preference.jsonl"):
        assert row["chosen_score"] > row["rejected_score"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "rlhf data synth x"
    assert manifest["counts"]["samples"] == 30
    assert manifest["judge"] == "rlhf.judges:positivity"


def test_cli_synth_with_builtin_prompts(tiny_model_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\nlogging:\n  progress: false\n")
    out = tmp_path / "out"
    code = main(["data", "synth", "--config", str(cfg), "--out", str(out), "--k", "2", "--n-prompts", "3",
                 "--n-eval-prompts", "2", "--max-new-tokens", "4", "--temperature", "1.0"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train_prompts"] == 3 and manifest["counts"]["eval_prompts"] == 2
    assert manifest["settings"]["k"] == 2 and manifest["settings"]["temperature"] == 1.0
    assert len(_read(out / "prompts_eval.jsonl")) == 2
    assert manifest["command"].startswith(f"rlhf data synth --config {cfg} --out {out} --k 2 ")
    assert "--temperature 1.0" in manifest["command"] and "--seed 42" in manifest["command"]


def test_from_samples_reselects_without_a_model(tiny_cfg, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(10)))
    first = tmp_path / "first"
    synth.run_synth(tiny_cfg, first, settings=SynthSettings(k=3, max_new_tokens=6, temperature=1.0, batch_size=8),
                    prompts_file=str(prompts))
    again = tmp_path / "again"
    tiny_cfg.model.name_or_path = str(tmp_path / "no-such-model")  # proves nothing is loaded or sampled
    manifest = synth.run_synth(tiny_cfg, again, settings=SynthSettings(k=3, pairs="all"),
                               samples_file=str(first / "samples.jsonl"))
    assert _read(again / "samples.jsonl") == _read(first / "samples.jsonl")
    assert _read(again / "sft.jsonl") == _read(first / "sft.jsonl")
    assert _read(again / "prompts_eval.jsonl") == _read(first / "prompts_eval.jsonl")
    best_worst = {(r["prompt"], r["chosen"], r["rejected"]) for r in _read(first / "preference.jsonl")}
    every = {(r["prompt"], r["chosen"], r["rejected"]) for r in _read(again / "preference.jsonl")}
    assert best_worst <= every and manifest["settings"]["pairs"] == "all"
