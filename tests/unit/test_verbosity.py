"""rlhf.verbosity and where it is used: length bias in both directions (inspect, preflight, synth manifests)
and the length-controlled win rate of `rlhf eval`. Hand-worked numbers; no model is loaded."""

from __future__ import annotations

import json
import logging

import pytest

from rlhf import preflight, verbosity
from rlhf.commands.evaluation import Candidate, format_table, summarize
from rlhf.config import config_from_dict
from rlhf.data import format_report, inspect
from rlhf.verbosity import length_bias, length_controlled_win_rate, pearson


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_length_bias_counts_both_directions_and_the_margin_correlation():
    # chosen vs rejected lengths: 4>2, 1<3, 5>5? no (tie), 2<6 -> longer 1/4, shorter 2/4
    bias = length_bias([4, 1, 5, 2], [2, 3, 5, 6], [1.0, None, 0.5, 0.0])
    assert (bias.n, bias.chosen_longer, bias.chosen_shorter) == (4, 0.25, 0.5)
    assert bias.length_ratio == pytest.approx((4 + 1 + 5 + 2) / (2 + 3 + 5 + 6))  # 12 / 16: a ratio of means
    assert bias.mean_diff == pytest.approx((2 - 2 + 0 - 4) / 4)
    # with margins: diffs (2, 0, -4) vs margins (1, .5, 0) -> means -2/3, .5; r = 3 / sqrt(56/3 * .5)
    assert bias.n_margins == 3
    assert bias.margin_corr == pytest.approx(3 / (56 / 3 * 0.5) ** 0.5)
    assert length_bias([], []) is None
    assert pearson([1, 2], [3, 4]) is None and pearson([1, 1, 1], [1, 2, 3]) is None


def test_warnings_name_the_direction():
    shorter = length_bias([1] * 8 + [5, 5], [4] * 10)  # chosen shorter in 80%
    assert verbosity.warnings(shorter) == [
        "verbosity bias: chosen is shorter in 80% of pairs and 0.45x the rejected length on average (-2.2 words); "
        "a reward model trained on this may learn 'shorter is better' (warned at >= 75% of pairs with a mean "
        "length ratio <= 0.91)"]  # means 18 / 10 and 40 / 10
    balanced = length_bias([1, 5] * 10, [3] * 20, [float(i % 2) for i in range(20)])  # margin = longer
    assert [w.split(" (r =")[0] for w in verbosity.warnings(balanced)] == [
        "verbosity bias: the pair margin tracks the length difference"]
    assert verbosity.warnings(length_bias([1, 5] * 3, [3] * 6, [0.0, 1.0] * 3)) == []  # r = 1, but 6 pairs


def test_inspect_reports_a_shorter_chosen_side(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "yes" if i < 9 else "yes it is fine", "rejected": "no it is not",
             "margin": 1.0} for i in range(10)]
    report = inspect(_write(tmp_path / "p.jsonl", rows))
    assert report.length_bias.chosen_longer == 0.0 and report.length_bias.chosen_shorter == 0.9
    text = format_report(report)  # ratio (9 * 1 + 4) / (10 * 4), difference (9 * -3 + 0) / 10
    assert ("verbosity: chosen longer in 0% of pairs, shorter in 90%; mean length chosen/rejected 0.33x, "
            "difference -2.7 words") in text.splitlines()  # equal margins: no correlation to report
    assert any("chosen is shorter in 90% of pairs" in w for w in report.warnings)


def test_preflight_warns_by_default_and_blocks_with_verbosity_block(tmp_path, caplog):
    rows = [{"prompt": f"q{i}", "chosen": "ok", "rejected": "a much longer reply than that"} for i in range(12)]
    raw = {"run": {"output_dir": str(tmp_path / "runs")}, "model": {"name_or_path": "tiny-random"},
           "data": {"preference": _write(tmp_path / "short.jsonl", rows)}, "final_stage": "orpo"}
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        assert [b.code for b in preflight.check(config_from_dict(raw, source="c.yaml"), ["orpo"])] == []
    assert "chosen is shorter in 100% of pairs" in caplog.text and "data.verbosity: block" in caplog.text
    raw["data"]["verbosity"] = "block"
    blockers = preflight.check(config_from_dict(raw, source="c.yaml"), ["reward", "orpo"])
    assert [b.code for b in blockers] == ["data.verbosity"]  # one source, reported once for both stages
    assert blockers[0].message.startswith(f"c.yaml: data.preference ({tmp_path / 'short.jsonl'}): verbosity bias")
    raw["data"]["verbosity"] = "off"
    assert preflight.check(config_from_dict(raw, source="c.yaml"), ["orpo"]) == []


def test_length_controlled_win_rate_hand_worked():
    # 10 prompts where the model is longer (d = +c): 9 wins; 10 where it is shorter (d = -c): 5 wins.
    # Two groups, two parameters: sigmoid(a + bc) = 0.9 and sigmoid(a - bc) = 0.5, so
    # a = (logit 0.9 + logit 0.5) / 2 = ln(9) / 2 = ln 3 and the rate at d = 0 is sigmoid(ln 3) = 3/4,
    # against a raw win rate of 14/20 = 0.7.
    scores = [1.0] * 9 + [-1.0] + [1.0] * 5 + [-1.0] * 5
    lengths = [9] * 10 + [3] * 10
    lc = length_controlled_win_rate(scores, [0.0] * 20, lengths, [6] * 20, l2=1e-9)
    assert lc == pytest.approx(0.75, abs=1e-6)
    # no length difference: the raw win rate (ties count half)
    assert length_controlled_win_rate([1, -1, 0, 1], [0] * 4, [5] * 4, [5] * 4) == pytest.approx(0.625, abs=1e-3)
    assert length_controlled_win_rate([1.0], [0.0], [1], [2]) is None


def test_eval_summary_and_table_carry_the_length_controlled_win_rate():
    def cand(name, judge, lengths):  # response ids: `n` tokens then EOS (id 2)
        return Candidate(name, name, response_ids=[[5] * n + [2] for n in lengths], judge=judge, eos_id=2)

    base = cand("sft", [0.0] * 4, [4] * 4)
    longer = cand("ppo", [1.0, 1.0, 1.0, -1.0], [8, 8, 8, 4])  # wins exactly where it is longer
    rows = {r["model"]: r for r in summarize([base, longer], base)}
    assert rows["sft"]["win_rate"] == 0.5 and rows["sft"]["lc_win_rate"] == pytest.approx(0.5)
    assert rows["ppo"]["win_rate"] == 0.75 and rows["ppo"]["lc_win_rate"] < 0.5
    assert rows["ppo"]["length"] == 7.0
    assert "length-controlled" in format_table(list(rows.values()), "sft").splitlines()[0]
