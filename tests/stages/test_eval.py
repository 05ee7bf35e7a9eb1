"""`rlhf eval` on a fake finished run: base, sft, dpo and orpo models (the tiny fixture, the last two with
perturbed weights) and a reward model. Checks the table, eval.json, responses.jsonl and the chart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from helpers import ROOT, cli_env, run_cli, write_cfg
from safetensors.torch import load_file, save_file

from rlhf import artifacts
from rlhf.config import config_from_dict

HERE = Path(__file__).parent


def fake_run(tmp_path: Path, policy: Path, reward: Path) -> dict:
    run_dir = tmp_path / "runs" / "t"
    for stage, src, noise in (("sft", policy, 0.0), ("reward", reward, 0.0), ("dpo", policy, 0.05),
                              ("orpo", policy, 0.2)):
        final = run_dir / stage / "final"
        shutil.copytree(src, final)
        if noise:
            gen = torch.Generator().manual_seed(int(noise * 100))
            weights = load_file(str(final / "model.safetensors"))
            save_file({k: v + noise * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
                      str(final / "model.safetensors"), metadata={"format": "pt"})
        artifacts.write_manifest(run_dir / stage, stage, inputs={}, config_hash="test", metrics={})
    return {"run": {"name": "t", "output_dir": str(tmp_path / "runs"), "seed": 0, "device": "cpu"},
            "model": {"name_or_path": str(policy)},
            "data": {"preference": str(ROOT / "data/tiny/preference.jsonl"),
                     "prompts": str(ROOT / "data/tiny/prompts.jsonl"), "eval_fraction": 0.2, "max_length": 128,
                     "max_prompt_length": 64},
            "final_stage": "dpo", "ppo": {"max_new_tokens": 8}, "logging": {"progress": False}}


def test_eval_compares_every_final_model_against_sft(tmp_path, tiny_model_dir, tiny_reward_dir, monkeypatch, capsys):
    from rlhf.commands.evaluation import run_eval

    monkeypatch.syspath_prepend(str(HERE))  # the judge: ppo_reward:target_share
    cfg = config_from_dict(fake_run(tmp_path, tiny_model_dir, tiny_reward_dir), source="test")
    result = run_eval(cfg, n_prompts=4, judge="ppo_reward:target_share")
    rows = {r["model"]: r for r in result["models"]}
    assert list(rows) == ["base", "sft", "dpo", "orpo"]
    assert result["baseline"] == "sft" and result["win_rate_by"] == "judge" and result["prompts"] == 4
    for name, r in rows.items():
        for key in ("reward", "judge", "kl", "length", "win_rate"):
            assert r[key] is not None, (name, key)
        assert 0.0 <= r["win_rate"] <= 1.0 and 0 < r["length"] <= 8
    # The reference against itself: log-ratio exactly 0, every prompt a tie. base is the same weights here.
    assert rows["sft"]["kl"] == 0.0 and rows["sft"]["win_rate"] == 0.5
    assert rows["base"]["kl"] == 0.0
    assert rows["orpo"]["kl"] > 0.0  # greedy responses are the perturbed model's own mode
    out = tmp_path / "runs" / "t" / "eval"
    assert json.loads((out / "eval.json").read_text())["models"] == result["models"]
    assert len((out / "responses.jsonl").read_text().splitlines()) == 4 * 4
    assert (out / "eval.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "win vs sft" in table and all(name in table for name in rows)


def test_eval_without_reward_model_or_sft_uses_the_base_model(tmp_path, tiny_model_dir):
    """As after `ppo.policy_init: base`: the base model is the reference, its own chat template is not the
    config's (`model.chat_template: chatml`, which the trained model saved), and the KL is still computed."""
    from rlhf.commands.evaluation import run_eval

    raw = fake_run(tmp_path, tiny_model_dir, tiny_model_dir)
    run_dir = tmp_path / "runs" / "t"
    for stage in ("sft", "reward", "dpo"):
        shutil.rmtree(run_dir / stage)
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    (base / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    raw["model"] = {"name_or_path": str(base), "chat_template": "chatml"}
    result = run_eval(config_from_dict(raw, source="test"), n_prompts=2)
    rows = {r["model"]: r for r in result["models"]}
    assert list(rows) == ["base", "orpo"] and result["baseline"] == "base"
    assert rows["orpo"]["reward"] is None and rows["orpo"]["win_rate"] is None and rows["orpo"]["kl"] > 0


def test_eval_cli_named_models(tmp_path, tiny_model_dir, tiny_reward_dir):
    config = write_cfg(tmp_path, fake_run(tmp_path, tiny_model_dir, tiny_reward_dir))
    proc = run_cli(["eval", "--config", str(config), "--models", "sft", "orpo", "--prompts", "2"], env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "win vs sft" in proc.stdout and "orpo" in proc.stdout
    result = json.loads((tmp_path / "runs" / "t" / "eval" / "eval.json").read_text())
    assert [r["model"] for r in result["models"]] == ["sft", "orpo"] and result["win_rate_by"] == "reward"
    bad = run_cli(["eval", "--config", str(config), "--models", "ppo"], env=cli_env())
    assert bad.returncode == 2 and "rlhf ppo" in bad.stderr


def test_sequence_kl_is_the_exact_per_position_kl_and_never_negative(tiny_model_dir, tmp_path):
    import torch

    from rlhf import models
    from rlhf.forwards import sequence_kl
    from rlhf.tiny import build_tiny

    tok = models.load_tokenizer(str(tiny_model_dir))
    policy = models.load_causal_lm(str(tiny_model_dir), tokenizer=tok).eval()
    other = models.load_causal_lm(str(build_tiny(tmp_path / "other", seed=3)), tokenizer=tok).eval()
    seqs = [([5, 9, 11, 13, 17, 19], 3), ([7, 8, 9, 10], 2)]
    assert sequence_kl(policy, policy, seqs, tok.pad_token_id) == [0.0, 0.0]
    got = sequence_kl(policy, other, seqs, tok.pad_token_id)
    ids, n = seqs[0]
    with torch.no_grad():
        logp = torch.log_softmax(policy(input_ids=torch.tensor([ids])).logits[0], -1)
        logq = torch.log_softmax(other(input_ids=torch.tensor([ids])).logits[0], -1)
    # positions n-1 .. len-2 predict the response tokens ids[n:]
    want = sum(float((logp[t].exp() * (logp[t] - logq[t])).sum()) for t in range(n - 1, len(ids) - 1))
    assert abs(got[0] - want) < 1e-4 and got[0] > 0 and got[1] > 0
