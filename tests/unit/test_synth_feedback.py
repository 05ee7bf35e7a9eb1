"""`rlhf data synth --method constitutional | judge` on the tiny model.

The mechanics (row layout, drops and counts, both-order judging, resume) are checked with scripted
replies in place of the random model's: `synth.generate_texts` and `llm_judge.label_probs` are replaced
by functions that answer from the prompt's text. The judge's label probabilities themselves are checked
on the tiny model (left-padded batches give each chat's own numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf import encoding
from rlhf.cli import main
from rlhf.commands import constitutional, llm_judge, synth
from rlhf.commands.synth import SynthSettings
from rlhf.config import config_from_dict
from rlhf.errors import ConfigError, DataError

CRITIQUE, REVISION = "Point out anything gloomy.", "Rewrite it upbeat, in one sentence."


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def cfg(tiny_model_dir, tmp_path):
    return config_from_dict({"run": {"output_dir": str(tmp_path / "runs"), "seed": 0},
                             "model": {"name_or_path": str(tiny_model_dir)},
                             "data": {"max_length": 64, "max_prompt_length": 32, "eval_fraction": 0.25},
                             "ppo": {"temperature": 1.0}, "logging": {"progress": False}})


@pytest.fixture
def principles(tmp_path) -> str:
    path = tmp_path / "principles.yaml"
    path.write_text(f"principles:\n  - name: upbeat\n    critique: {CRITIQUE}\n    revision: {REVISION}\n")
    return str(path)


def _prompts(tmp_path, names: list[str]) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": n}) + "\n" for n in names))
    return str(path)


# ------------------------------------------------------------------------------------------ constitutional

# prompt kind -> (original samples, revision): each (text, finished)
SCRIPT = {
    "keep": ([("the day is bad", True)], ("the day is great", True)),
    "late": ([("cut off", False), ("", True), ("finally done", True)], ("finally, done and happy", True)),
    "quoted": ([("meh", True)], ('"so lovely"', True)),
    "cut": ([("never ends", False)] * 3, ("unused", True)),
    "empty": ([("grim", True)], ("  ", True)),
    "same": ([("the same text", True)], ("the  same text ", True)),
    "long": ([("short", True)], ("a revision that runs on", False)),
}


def scripted_generate(calls: list[int] | None = None):
    """A stand-in for synth.generate_texts: originals, critiques and revisions chosen by the prompt's kind."""
    seen: dict[str, int] = {}

    def generate(model, tokenizer, chats, config, max_prompt_length, batch_size):
        if calls is not None:
            calls.append(len(chats))
        out = []
        for chat in chats:
            kind = chat[0]["content"].split()[0]
            if len(chat) == 1:  # an original: the next of the kind's samples
                i = seen.get(chat[0]["content"], 0)
                seen[chat[0]["content"]] = i + 1
                samples = SCRIPT[kind][0]
                out.append(samples[i % len(samples)])
            elif chat[-1]["content"] == CRITIQUE:
                out.append((f"critique of {chat[1]['content']}", True))
            else:
                assert chat[-1]["content"] == REVISION and chat[-2]["role"] == "assistant"
                out.append(SCRIPT[kind][1])
        return out

    return generate


def test_constitutional_rows_drops_and_counts(cfg, principles, tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "generate_texts", scripted_generate())
    prompts = _prompts(tmp_path, [f"{kind} prompt" for kind in SCRIPT])
    manifest = constitutional.run_constitutional(
        cfg, tmp_path / "out", principles_file=principles, settings=SynthSettings(k=3, batch_size=6),
        prompts_file=prompts, gold_judge="rlhf.judges:positivity")
    out = tmp_path / "out"
    pairs = _read(out / "preference.jsonl") + _read(out / "preference_eval.jsonl")
    by_prompt = {r["prompt"].split()[0]: r for r in pairs}
    assert set(by_prompt) == {"keep", "late", "quoted"}
    assert by_prompt["keep"] == {"prompt": "keep prompt", "chosen": "the day is great", "rejected": "the day is bad",
                                 "principle": "upbeat", "critique": "critique of the day is bad"}
    assert by_prompt["late"]["rejected"] == "finally done"  # the first finished, non-empty sample of 3
    assert by_prompt["quoted"]["chosen"] == "so lovely"  # wrapping quotes removed
    counts = manifest["counts"]
    assert counts["dropped"] == {"no_finished_original": 1, "revision_empty": 1, "revision_identical": 1,
                                 "revision_cut_off": 1}
    assert counts["pairs"] + counts["pairs_eval"] == 3 and counts["prompts"] == 7
    assert counts["by_principle"] == {"upbeat": {"prompts": 7, "pairs": 3}}
    train = [r["prompt"] for r in _read(out / "prompts.jsonl")]
    assert _read(out / "sft.jsonl") == [{"prompt": r["prompt"], "completion": r["chosen"]}
                                        for r in _read(out / "preference.jsonl")]
    assert all(r["prompt"] in train for r in _read(out / "sft.jsonl"))
    log = {r["prompt"].split()[0]: r for r in _read(out / "constitutional.jsonl")}
    assert log["cut"]["critique"] is None and log["long"]["revision"] == "a revision that runs on"
    assert manifest["gold"]["pairs"] == 3 and manifest["verbosity"]["n"] == counts["pairs"]
    assert manifest["method"] == "constitutional" and manifest["settings"]["critique_max_new_tokens"] == 64


def test_constitutional_resumes_after_a_kill_mid_write(cfg, principles, tmp_path, monkeypatch):
    prompts = _prompts(tmp_path, [f"keep prompt {i}" for i in range(8)])
    whole = tmp_path / "whole"
    monkeypatch.setattr(synth, "generate_texts", scripted_generate())
    constitutional.run_constitutional(cfg, whole, principles_file=principles, prompts_file=prompts,
                                      settings=SynthSettings(k=1, batch_size=3))
    # the same run killed after its first chunk of 3 prompts, the 4th's line half-written
    out = tmp_path / "out"
    out.mkdir()
    (out / "constitutional.settings.json").write_text((whole / "constitutional.settings.json").read_text())
    lines = (whole / "constitutional.jsonl").read_text().splitlines(keepends=True)
    (out / "constitutional.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    calls: list[int] = []
    monkeypatch.setattr(synth, "generate_texts", scripted_generate(calls))
    constitutional.run_constitutional(cfg, out, principles_file=principles, prompts_file=prompts,
                                      settings=SynthSettings(k=1, batch_size=3))
    assert calls == [3, 3, 3, 2, 2, 2]  # originals, critiques, revisions: chunk 2 (3 prompts), chunk 3 (2)
    for name in ("preference.jsonl", "preference_eval.jsonl", "sft.jsonl", "constitutional.jsonl"):
        assert _read(out / name) == _read(whole / name), name
    # other settings on the same output dir are refused, not mixed in
    with pytest.raises(DataError, match=r"holds 8 prompts done with other settings \(k: 1 there, 2 now\)"):
        constitutional.run_constitutional(cfg, out, principles_file=principles, prompts_file=prompts,
                                          settings=SynthSettings(k=2, batch_size=3))


def test_principles_file_errors_name_the_entry(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("principles:\n  - critique: find faults\n")
    with pytest.raises(ConfigError, match="principle 1 needs non-empty `critique` and `revision`"):
        constitutional.load_principles(path)
    path.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="expected a non-empty `principles:` list"):
        constitutional.load_principles(path)
    shipped = constitutional.load_principles(Path(__file__).parents[2] / "data" / "quickstart" / "principles.yaml")
    assert shipped and all(p.critique and p.revision for p in shipped)


# ------------------------------------------------------------------------------------------------- judge

# k=3 samples per prompt kind, each (text, finished); a pair needs two distinct finished, non-empty ones
SAMPLES = {
    "agree": [("good reply", True), ("bad reply", True), ("bad reply", True)],  # 1 pair
    "position": [("good one", True), ("bad one", True), ("good one", True)],  # 1 pair
    "dup": [("same", True)] * 3,  # none
    "cut": [("good but cut", False), ("bad", True), ("", True)],  # none
    "three": [("good x", True), ("bad y", True), ("good z", True)],  # 3 pairs
}


def scripted_probs(chats):
    """P(A) / (P(A) + P(B)) and the label mass: the "position" prompts always get A at 0.7; otherwise the
    response containing "good" wins with 0.8 (as A) or 0.3 (as B); two good ones tie near 0.5."""
    out = []
    for chat in chats:
        text = chat[0]["content"]
        a = text.split("Response A: ")[1].split("\n")[0]
        b = text.split("Response B: ")[1].split("\n")[0]
        if "Request: position" in text:
            out.append((0.7, 0.9))
        elif ("good" in a) == ("good" in b):
            out.append((0.52, 0.9))
        else:
            out.append((0.8 if "good" in a else 0.3, 0.9))
    return out


def test_judge_both_orders_drops_and_margins(cfg, tmp_path, monkeypatch):
    def generate(model, tokenizer, chats, config, max_prompt_length, batch_size):
        seen: dict[str, int] = {}  # one call per chunk, each prompt's k chats one after the other
        out = []
        for chat in chats:
            kind = chat[0]["content"].split()[0]
            seen[kind] = seen.get(kind, -1) + 1
            out.append(SAMPLES[kind][seen[kind]])
        return out

    judged: list[list] = []
    monkeypatch.setattr(synth, "generate_texts", generate)
    monkeypatch.setattr(llm_judge, "label_probs", lambda m, tok, chats, bs: judged.append(chats) or scripted_probs(chats))
    prompts = _prompts(tmp_path, [f"{kind} prompt" for kind in SAMPLES])
    out = tmp_path / "out"
    manifest = llm_judge.run_judge(cfg, out, judge_model=cfg.model.name_or_path, prompts_file=prompts,
                                   settings=SynthSettings(k=3, batch_size=15, pairs="all"),
                                   gold_judge="rlhf.judges:positivity")
    assert len(judged) == 1  # one chunk of 5 prompts
    chats = [c[0]["content"] for c in judged[0]]
    assert len(chats) == 2 * 5  # 5 pairs, each in both orders, one after the other
    for first, second in zip(chats[::2], chats[1::2], strict=True):
        assert first.split("Response A: ")[1].split("\n")[0] == second.split("Response B: ")[1].split("\n")[0]
    rows = {r["prompt"].split()[0]: r for r in _read(out / "preference.jsonl") + _read(out / "preference_eval.jsonl")}
    assert rows["agree"]["chosen"] == "good reply" and rows["agree"]["rejected"] == "bad reply"
    assert rows["agree"]["margin"] == pytest.approx(0.5) and rows["agree"]["judge_p_a"] == [0.8, 0.3]
    assert set(rows) == {"agree", "three"}
    counts = {k: manifest["counts"]["train"][k] + manifest["counts"]["eval"][k] for k in manifest["counts"]["train"]}
    # position: A wins in both orders, so the orders disagree; three: good x vs good z is 0.52 both times
    assert counts == {"prompts_without_pair": 2, "pairs_judged": 5, "dropped_order_disagree": 2,
                      "dropped_within_gap": 0}
    assert manifest["counts"]["preference"] + manifest["counts"]["preference_eval"] == 3
    assert manifest["judge_label_mass"] == 0.9
    # VADER scores "good ..." above "bad ..." and "good one" (position) too; the tie of good x / good z is
    # not judged by it either way. Single orders: agree, three's 2 decided pairs right twice, position once.
    gold = manifest["gold"]
    assert (gold["pairs"], gold["prefers_chosen"], gold["judged_pairs"]) == (3, 1.0, 4)
    assert gold["single_order_agreement"] == 7 / 8 and gold["difference_agreement"] == 0.75
    train = {r["prompt"] for r in _read(out / "prompts.jsonl")}
    sft = {r["prompt"].split()[0]: r["completion"] for r in _read(out / "sft.jsonl")}
    assert sft == {k: v for k, v in {"agree": "good reply", "three": "good x"}.items() if f"{k} prompt" in train}
    # --pairs best-worst on a re-run: the judged log is read back; no model is loaded, nothing sampled or judged
    monkeypatch.setattr(synth, "generate_texts", None)
    monkeypatch.setattr(synth, "load_pair", None)
    again = llm_judge.run_judge(cfg, out, judge_model=cfg.model.name_or_path, prompts_file=prompts,
                                settings=SynthSettings(k=3, batch_size=15, pairs="best-worst"))
    assert len(judged) == 1 and again["counts"]["preference"] + again["counts"]["preference_eval"] == 2


def test_verdict_reads_both_orders():
    assert llm_judge.verdict({"x": 0, "y": 1, "p_a": [0.9, 0.2]}) == (0, 1, pytest.approx(0.7))
    assert llm_judge.verdict({"x": 0, "y": 1, "p_a": [0.4, 0.55]}) == (1, 0, pytest.approx(0.15))
    assert llm_judge.verdict({"x": 0, "y": 1, "p_a": [0.7, 0.7]}) is None  # position wins both times
    assert llm_judge.verdict({"x": 0, "y": 1, "p_a": [0.5, 0.3]}) is None  # no preference in one order


def test_label_probs_on_the_tiny_model_match_unpadded_rows(cfg):
    import torch

    model, tok = synth.load_generator(cfg, torch.device("cpu"))
    chats = [llm_judge.judge_chat(llm_judge.DEFAULT_TEMPLATE, "Tell me a story.", "Once upon a time.", "No."),
             llm_judge.judge_chat(llm_judge.DEFAULT_TEMPLATE, "Hi?", "Hello there, how are you doing today?", "Hi.")]
    batched = llm_judge.label_probs(model, tok, chats, batch_size=2)  # the second chat is left-padded
    id_a, id_b = llm_judge.label_ids(tok)
    for chat, (p, mass) in zip(chats, batched, strict=True):
        ids = torch.tensor([encoding.prompt_ids(tok, chat)])
        with torch.no_grad():
            probs = model(input_ids=ids).logits[0, -1].softmax(-1)
        assert p == pytest.approx((probs[id_a] / (probs[id_a] + probs[id_b])).item(), abs=1e-5)
        assert mass == pytest.approx((probs[id_a] + probs[id_b]).item(), abs=1e-5)


def test_cli_rejects_flags_of_another_method(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("logging:\n  progress: false\n")
    base = ["data", "synth", "--config", str(cfg), "--out", str(tmp_path / "o")]
    assert main(base + ["--method", "constitutional"]) == 2
    assert main(base + ["--method", "judge", "--judge-model", "m", "--judge", "rlhf.judges:positivity"]) == 2
    assert main(base + ["--principles", "p.yaml"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == ["error: --method constitutional needs --principles",
                   "error: --judge: not a flag of --method judge; for the model judge use --judge-model, and "
                   "--gold-judge to score the pairs with a program",
                   "error: --principles: not a flag of --method program"]
