"""The held-out reports use the losses each stage trains with: DPO's configured `dpo.loss_type`, and the
reward model's Bradley-Terry loss (with margins when `reward.margin` is on)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf import losses
from rlhf.stages import dpo, reward

POLICY = [[-4.0, -6.0], [-5.0, -5.5], [-7.0, -3.0]]  # per row [chosen, rejected] summed log-probs
REF = [[-5.0, -5.0], [-5.0, -5.0], [-5.0, -5.0]]


@pytest.mark.parametrize(("loss_type", "fn"), [("sigmoid", losses.dpo_loss), ("ipo", losses.ipo_loss),
                                               ("hinge", losses.hinge_loss)])
def test_dpo_heldout_loss_follows_the_loss_type(loss_type, fn):
    report = dpo.rewards_report(POLICY, REF, 0.5, loss_type)
    sides = [torch.tensor(side) for logps in (POLICY, REF) for side in zip(*logps, strict=True)]
    assert report["loss"] == pytest.approx(float(fn(*sides, 0.5)[0]))
    assert report["rewards/accuracy"] == pytest.approx(2 / 3)


def test_the_three_dpo_losses_differ_on_the_same_pairs():
    values = {t: dpo.rewards_report(POLICY, REF, 0.5, t)["loss"] for t in dpo.LOSSES}
    assert len({round(v, 6) for v in values.values()}) == 3


def test_reward_heldout_loss_is_bradley_terry_with_optional_margins():
    pairs = [(2.0, 1.0), (0.0, 1.0)]
    rows = [{"margin": 1.0}, {"margin": 0.5}]
    plain = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(1.0)))) / 2
    assert reward.heldout_loss(pairs, rows, use_margin=False) == pytest.approx(plain)
    with_margin = -(math.log(1 / (1 + math.exp(0.0))) + math.log(1 / (1 + math.exp(1.5)))) / 2
    assert reward.heldout_loss(pairs, rows, use_margin=True) == pytest.approx(with_margin)
