"""One length-bias answer per file: `rlhf data inspect FILE --tokenizer`, `rlhf data inspect --config` and
preflight all measure the response alone (`verbosity.response_length`: the policy's tokens when its
tokenizer is here, else words, and they say which), report a ratio of mean lengths that agrees in sign with
the mean difference, and stay quiet about a difference of a few percent."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from rlhf import cli, models, preflight, verbosity
from rlhf.config import config_from_dict
from rlhf.data import inspect
from rlhf.verbosity import length_bias


def test_a_3_percent_difference_in_every_pair_is_not_a_bias():
    assert verbosity.warnings(length_bias([103] * 20, [100] * 20)) == []  # longer in 100% of pairs, ratio 1.03
    assert verbosity.warnings(length_bias([100] * 20, [103] * 20)) == []  # shorter in 100%, ratio 0.97
    assert [w.split(" and ")[0] for w in verbosity.warnings(length_bias([110] * 20, [100] * 20))] == [
        "verbosity bias: chosen is longer in 100% of pairs"]  # ratio 1.10: the threshold
    assert [w.split(" and ")[0] for w in verbosity.warnings(length_bias([100] * 20, [111] * 20))] == [
        "verbosity bias: chosen is shorter in 100% of pairs"]  # ratio 0.90, below 1 / 1.10 = 0.909


def test_ratio_and_difference_agree_in_sign():
    # chosen 3 vs 1 and 1 vs 8: the mean of the ratios, (3 + 1/8) / 2 = 1.56, says "longer" while the mean
    # difference, (2 - 7) / 2 = -2.5, says "shorter"; the ratio of the means is 4 / 9 = 0.44
    bias = length_bias([3, 1], [1, 8], unit="tokens")
    assert bias.length_ratio == pytest.approx(4 / 9) and bias.mean_diff == -2.5
    assert verbosity.describe(bias) == ("chosen longer in 50% of pairs, shorter in 50%; mean length chosen/rejected "
                                        "0.44x, difference -2.5 tokens")


def test_inspect_and_preflight_give_one_answer_in_the_policys_tokens(tmp_path, rlhf_cache, caplog, capsys):
    tokenizer = models.load_tokenizer(models.resolve_model("tiny-random"))  # builds the alias preflight finds
    prompt = " ".join(["please explain this in some detail"] * 10)  # 60 words both sides share

    def pair(i: int) -> dict:
        """TRL's conversational form with the prompt inside each side. The chosen reply has 2 words but 23
        tokens, the rejected one 5 words and 6 tokens: in words chosen is shorter, in the policy's tokens longer."""
        user = {"role": "user", "content": f"{prompt} {i}"}
        return {"chosen": [user, {"role": "assistant", "content": "Photosynthesis electroencephalography"}],
                "rejected": [user, {"role": "assistant", "content": "no it is not so"}]}

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair(i)) + "\n" for i in range(12)))
    expected = ("verbosity bias: chosen is longer in 100% of pairs and 3.83x the rejected length on average "
                "(+17.0 tokens); a reward model trained on this may learn 'longer is better' (warned at >= 75% of "
                "pairs with a mean length ratio >= 1.10)")  # 23 / 6 tokens of the replies alone
    assert inspect(str(path), tokenizer=tokenizer).warnings == [expected]

    raw = {"run": {"output_dir": str(tmp_path / "runs")}, "model": {"name_or_path": "tiny-random"},
           "data": {"preference": str(path)}, "final_stage": "orpo"}
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        assert preflight.check(config_from_dict(raw, source="c.yaml"), ["orpo"]) == []
    assert f"c.yaml: data.preference ({path}): {expected} (data.verbosity: block" in caplog.text

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["data", "inspect", "--config", str(tmp_path / "c.yaml"), "-n", "0"]) == 0
    assert f"  - {expected}" in capsys.readouterr().out.splitlines()
