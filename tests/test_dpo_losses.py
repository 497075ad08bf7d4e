"""Preference losses against values computed by hand (math module) on fixed log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from lmf.train.dpo.losses import preference_loss, reward_metrics, uses_reference_model

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

# two pairs; sums over answer tokens
PC = torch.tensor([-4.0, -9.0])  # policy chosen
PR = torch.tensor([-6.0, -7.0])  # policy rejected
RC = torch.tensor([-5.0, -8.0])  # reference chosen
RR = torch.tensor([-5.5, -7.5])  # reference rejected
LC = torch.tensor([2, 3])  # chosen lengths
LR = torch.tensor([4, 2])  # rejected lengths


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def h_pair(i: int, avg: bool = False) -> float:
    pc, pr, rc, rr = PC[i].item(), PR[i].item(), RC[i].item(), RR[i].item()
    if avg:
        pc, rc = pc / LC[i].item(), rc / LC[i].item()
        pr, rr = pr / LR[i].item(), rr / LR[i].item()
    return (pc - pr) - (rc - rr)


def run(loss_type, **kw):
    return preference_loss(PC, PR, RC, RR, loss_type=loss_type, chosen_lengths=LC, rejected_lengths=LR, **kw)


def test_sigmoid_matches_hand_values():
    beta = 0.1
    losses, cr, rr = run("sigmoid", beta=beta)
    # pair 0: h = (-4+6) - (-5+5.5) = 1.5 ; pair 1: h = (-9+7) - (-8+7.5) = -1.5
    assert h_pair(0) == pytest.approx(1.5) and h_pair(1) == pytest.approx(-1.5)
    expected = [-logsigmoid(beta * 1.5), -logsigmoid(beta * -1.5)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert cr.tolist() == pytest.approx([0.1 * 1.0, 0.1 * -1.0])
    assert rr.tolist() == pytest.approx([0.1 * -0.5, 0.1 * 0.5])


def test_cdpo_label_smoothing():
    beta, ls = 0.5, 0.2
    losses, _, _ = run("sigmoid", beta=beta, label_smoothing=ls)
    expected = [-(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h) for h in (1.5, -1.5)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_hinge():
    beta = 0.5
    losses, _, _ = run("hinge", beta=beta)
    assert losses.tolist() == pytest.approx([max(0.0, 1 - 0.75), max(0.0, 1 + 0.75)])
    losses, _, _ = run("hinge", beta=2.0)  # 1 - 2*1.5 < 0 -> zero loss
    assert losses[0].item() == 0.0


def test_ipo_uses_length_averaged_logps():
    beta = 0.1
    losses, cr, rr = run("ipo", beta=beta)
    # pair 0: (-4/2 - -6/4) - (-5/2 - -5.5/4) = (-2+1.5) - (-2.5+1.375) = -0.5+1.125 = 0.625
    assert h_pair(0, avg=True) == pytest.approx(0.625)
    expected = [(h_pair(i, avg=True) - 1 / (2 * beta)) ** 2 for i in range(2)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-5)
    assert cr[0].item() == pytest.approx(beta * (-2.0 - -2.5))
    assert rr[1].item() == pytest.approx(beta * (-7.0 / 2 - -7.5 / 2))


def test_orpo_reference_free_odds_ratio_plus_nll():
    beta = 0.1
    losses, cr, rr = preference_loss(PC, PR, loss_type="orpo", beta=beta, chosen_lengths=LC, rejected_lengths=LR)
    expected, rewards = [], []
    for i in range(2):
        c, r = PC[i].item() / LC[i].item(), PR[i].item() / LR[i].item()
        log_odds = (c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r)))
        expected.append(-c - beta * logsigmoid(log_odds))
        rewards.append((beta * c, beta * r))
    assert losses.tolist() == pytest.approx(expected, abs=1e-5)
    assert cr.tolist() == pytest.approx([x[0] for x in rewards])
    assert rr.tolist() == pytest.approx([x[1] for x in rewards])


def test_orpo_is_finite_at_logp_zero():
    losses, _, _ = preference_loss(torch.tensor([0.0]), torch.tensor([-1.0]), loss_type="orpo",
                                   chosen_lengths=torch.tensor([1]), rejected_lengths=torch.tensor([1]))
    assert torch.isfinite(losses).all()


def test_simpo_gamma_margin():
    beta, gamma = 2.0, 0.5
    losses, cr, _ = preference_loss(PC, PR, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                                    chosen_lengths=LC, rejected_lengths=LR)
    expected = []
    for i in range(2):
        c, r = PC[i].item() / LC[i].item(), PR[i].item() / LR[i].item()
        expected.append(-logsigmoid(beta * (c - r) - gamma))
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert cr.tolist() == pytest.approx([beta * -2.0, beta * -3.0])


def test_ftx_adds_length_averaged_nll_of_chosen():
    base, _, _ = run("sigmoid", beta=0.1)
    with_ftx, _, _ = run("sigmoid", beta=0.1, ftx=0.5)
    assert (with_ftx - base).tolist() == pytest.approx([0.5 * 4.0 / 2, 0.5 * 9.0 / 3])


def test_gradients_flow_to_policy_only_direction():
    pc = PC.clone().requires_grad_(True)
    pr = PR.clone().requires_grad_(True)
    losses, _, _ = preference_loss(pc, pr, RC, RR, loss_type="sigmoid", beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected


def test_errors():
    with pytest.raises(ValueError, match="reference"):
        preference_loss(PC, PR, loss_type="sigmoid")
    with pytest.raises(ValueError, match="chosen_lengths"):
        preference_loss(PC, PR, RC, RR, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown pref_loss"):
        preference_loss(PC, PR, RC, RR, loss_type="kto")
    assert not uses_reference_model("simpo") and uses_reference_model("ipo")


def test_reward_metrics():
    m = reward_metrics(torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.0, 0.0, 3.0]))
    assert m["rewards/accuracies"].mean().item() == pytest.approx(1 / 3)
    assert m["rewards/margins"].tolist() == [1.0, -1.0, -1.0]
