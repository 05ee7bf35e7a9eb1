"""The final stage scored by programs (`ppo.rewards`): each prompt row's fields reach the function aligned
with its responses, the sources are summed by weight, and with programs alone and no critic nothing of the
reward stage is needed, and with `ppo.policy_init: base` nothing of the SFT stage either."""

from __future__ import annotations

import json

import pytest
from test_ppo import HERE, make_cfg, run_ppo

from rlhf import preflight
from rlhf.commands.export import export

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _reward_module_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_programs_get_their_rows_fields_and_are_summed_by_weight(tmp_path, tiny_model_dir):
    import ppo_reward

    questions = [f"Repeat the letter {c}." for c in "abcdefgh"]
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": [{"role": "user", "content": q}], "answer": q[-2]}) + "\n" for q in questions),
        encoding="utf-8")
    sources = [{"source": "ppo_reward:answer_seen", "weight": 2.0}, {"source": "ppo_reward:target_share", "weight": 0.5}]
    cfg = make_cfg(tmp_path, tiny_model_dir, None, steps=2, advantage="rloo", samples_per_prompt=2,
                   rollout_batch_size=4, mini_batch_size=4, grad_accum=1, ppo_epochs=1, rewards=sources,
                   missing_eos_penalty=None, normalize_reward=False, policy_init="base")
    assert cfg.stages == ["ppo"] and preflight.check(cfg, ["ppo"]) == []
    ppo_reward.CALLS.clear()
    result, seen = run_ppo(cfg)  # no sft/ or reward/ stage exists under the run: the actor starts from the base
    assert not (cfg.run.dir / "sft").exists() and not (cfg.run.dir / "reward").exists()
    assert seen[0]["objective/kl"] == 0.0  # actor == reference == the base model before the first update
    assert len(ppo_reward.CALLS) == 2
    for call in ppo_reward.CALLS:  # 4 prompts x 2 samples, each row's answer next to its own prompt
        assert len(call["answer"]) == 8
        assert call["answer"] == [p[-1]["content"][-2] for p in call["prompts"]]
        texts = [p[-1]["content"] for p in call["prompts"]]
        assert all(texts.count(t) == 2 for t in texts)  # each prompt answered twice (in the update's order)
    for line in (result.final_dir.parent / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        answer = sample["prompt"][-2]
        share = ppo_reward.target_share([], [sample["response"]])[0]
        assert sample["score"] == pytest.approx(2.0 * (answer in sample["response"]) + 0.5 * share, abs=1e-6)
    stage = json.loads((result.final_dir.parent / "stage.json").read_text())
    assert set(stage["devices"]) == {"actor", "ref"}  # no critic, no reward model
    assert stage["inputs"]["reward"] == "fn:ppo_reward:answer_seen, fn:ppo_reward:target_share"
    assert stage["inputs"]["model"] == str(tiny_model_dir)
    exported = export(result.final_dir.parent / "checkpoints" / "checkpoint-2", tmp_path / "exported")
    assert (exported / "model.safetensors").is_file()  # rebuilt from the base model, as the stage built it
