"""rlhf.judges: the quickstart's gold judge is a deterministic program with the reward_fn signature."""

from __future__ import annotations

import pytest

from rlhf import judges
from rlhf.commands.evaluation import load_judge

CHAT = [{"role": "user", "content": "Write one short sentence about rainy weather."}]


def test_positivity_orders_replies_by_sentiment():
    replies = ["Rainy days are wonderful, cozy and full of joy!",
               "It rains in April.",
               "Rainy weather is awful, gloomy and depressing."]
    happy, neutral, grumpy = judges.positivity([CHAT] * 3, replies)
    assert happy > 0.5
    assert neutral == pytest.approx(0.0)
    assert grumpy < -0.5


def test_positivity_reads_negation_and_is_bounded():
    good, not_good = judges.positivity(["p", "p"], ["The coffee is good.", "The coffee is not good."])
    assert good > 0 > not_good
    scores = judges.positivity(["p"] * 2, ["great " * 50, "terrible " * 50])
    assert all(-1.0 <= s <= 1.0 for s in scores)


def test_empty_and_whitespace_responses_score_zero():
    assert judges.positivity(["p", "p"], ["", "  \n "]) == [0.0, 0.0]


def test_deterministic_and_plain_floats():
    text = ["I love a quiet evening with a good book."]
    first, second = judges.positivity([CHAT], text), judges.positivity([CHAT], text)
    assert first == second
    assert type(first[0]) is float


def test_negativity_mirrors_positivity():
    replies = ["What a lovely day!", "This is a disaster."]
    assert judges.negativity(["p", "p"], replies) == [-s for s in judges.positivity(["p", "p"], replies)]


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        judges.positivity(["a", "b"], ["only one"])


def test_loadable_as_module_function_spec():
    fn = load_judge("rlhf.judges:positivity")
    assert fn is judges.positivity
    assert fn([CHAT], ["Wonderful!"])[0] > 0.5


def test_paired_difference_by_hand():
    # diffs [0.2, 0.4, 0.6]: mean 0.4, sample variance 0.04, SE sqrt(0.04 / 3)
    diff, se = judges.paired_difference([0.3, 0.5, 0.7], [0.1, 0.1, 0.1])
    assert diff == pytest.approx(0.4)
    assert se == pytest.approx((0.04 / 3) ** 0.5)


def test_compare_reads_eval_responses(tmp_path, capsys):
    import json

    path = tmp_path / "responses.jsonl"
    rows = [{"model": m, "prompt": [], "response": "", "judge": j, "reward": None, "kl": None}
            for m, scores in (("sft", [0.0, 0.1, 0.2]), ("ppo", [0.5, 0.7, 0.6])) for j in scores]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {r["model"]: r for r in judges.compare(str(path), "sft")}
    assert out["ppo"]["diff"] == pytest.approx(0.5) and out["ppo"]["clear"]
    assert "diff" not in out["sft"]
    assert judges._main(["compare", str(path)]) == 0
    assert "above 2 SE" in capsys.readouterr().out
