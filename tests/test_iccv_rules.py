"""The ICCV 2021 rules (METHODS_ICCV.md section 1) on hand-computed cases."""
import math

import pytest
import torch

from modules.aggregation import positive_head_mean, rollout_product
from modules.iccv import bimodal_rule, init_relevance, rbar, self_attention_rule


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)[None]


def test_eq5_head_mean_clamps_each_head_then_averages():
    A = torch.tensor([[[[0.5, 0.5], [0.2, 0.8]], [[1.0, 0.0], [0.4, 0.6]]]], dtype=torch.float64)
    G = torch.tensor([[[[2.0, -1.0], [1.0, 1.0]], [[-3.0, 5.0], [0.5, -2.0]]]], dtype=torch.float64)
    # head 0: G*A = [[1, -.5], [.2, .8]] -> [[1, 0], [.2, .8]]; head 1: [[-3, 0], [.2, -1.2]] -> [[0, 0], [.2, 0]]
    torch.testing.assert_close(positive_head_mean(G * A), t([[0.5, 0.0], [0.2, 0.4]]))


def test_self_attention_rule_uses_the_values_before_the_update():
    R_ss, R_sq = t([[1.0, 0.0], [0.0, 1.0]]), t([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    abar = t([[0.0, 1.0], [0.5, 0.0]])
    delta = self_attention_rule({"s": R_ss, "q": R_sq}, abar)
    torch.testing.assert_close(R_ss + delta["s"], t([[1.0, 1.0], [0.5, 1.0]]))  # I + Abar
    torch.testing.assert_close(R_sq + delta["q"], t([[2.0, 1.0, 0.0], [2.0, 0.5, 0.0]]))  # R_sq + Abar R_sq


def test_rbar_rows_sum_to_two_and_the_nan_guard():
    R = t([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0]])
    # R - I = [[1, 1, 0], [0, 0, 0], [1, 1, 2]], row sums 2, 0, 4
    guarded = rbar(R)
    torch.testing.assert_close(guarded, t([[1.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.25, 0.25, 1.5]]))
    assert guarded[0, 0].sum().item() == 2.0 and guarded[0, 2].sum().item() == 2.0
    raw = rbar(R, nan_guard=False)  # the published LXMERT generator: 0/0 stays NaN
    assert all(math.isnan(v) for v in raw[0, 1].tolist())
    torch.testing.assert_close(raw[0, [0, 2]], guarded[0, [0, 2]])


def test_rbar_masks_padded_tokens():
    R = t([[2.0, 1.0, 0.0], [0.5, 1.0, 0.0], [7.0, 7.0, 7.0]])
    out = rbar(R, mask=torch.tensor([[True, True, False]]))
    torch.testing.assert_close(out, t([[1.5, 0.5, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_bimodal_rule_transposes_the_normalised_self_relevance():
    R_ss = t([[2.0, 1.0], [0.5, 1.0]])  # Rbar_ss = [[1.5, .5], [1, 1]], not symmetric
    R_qq = torch.eye(3, dtype=torch.float64)[None]  # Rbar of I: the NaN rows guarded to 0, plus I = I
    R_qs = t([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    abar = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    d_sq, d_ss = bimodal_rule(R_ss, R_qq, R_qs, abar)
    torch.testing.assert_close(d_sq, t([[1.5, 1.0, 0.0], [0.5, 1.0, 0.0]]))  # Rbar^T Abar, not Rbar Abar
    torch.testing.assert_close(d_ss, t([[1.0, 2.0], [3.0, 4.0]]))  # Eq. 11: Abar R_qs
    d_sq, _ = bimodal_rule(R_ss, R_qq, R_qs, abar, normalize=False)  # ablation: R_ss^T Abar R_qq
    torch.testing.assert_close(d_sq, t([[2.0, 0.5, 0.0], [1.0, 1.0, 0.0]]))
    d_sq, _ = bimodal_rule(R_ss, R_qq, R_qs, abar, self_in_rule_10=False)  # ablation: Abar alone
    torch.testing.assert_close(d_sq, abar)


def test_bimodal_rule_nan_guard():
    R_ss = t([[1.0, 0.0], [0.0, 1.0]])  # R - I = 0: every row of Rbar is 0/0
    R_qq = t([[1.0, 0.0], [0.0, 1.0]])
    abar = t([[1.0, 0.0], [0.0, 1.0]])
    d_sq, _ = bimodal_rule(R_ss, R_qq, torch.zeros(1, 2, 2, dtype=torch.float64), abar, nan_guard=False)
    assert torch.isnan(d_sq).all()
    d_sq, _ = bimodal_rule(R_ss, R_qq, torch.zeros(1, 2, 2, dtype=torch.float64), abar)
    torch.testing.assert_close(d_sq, abar)  # NaN rows become 0, Rbar = I


def test_initialisation_identity_and_zeros_per_sample_with_masks():
    masks = {"t": torch.tensor([[True, True, True], [True, False, False]])}
    R = init_relevance({"t": 3, "i": 2}, 2, torch.float64, torch.device("cpu"), masks)
    torch.testing.assert_close(R["t", "t"][0], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(R["t", "t"][1], torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)))
    assert R["t", "i"].shape == (2, 3, 2) and not R["t", "i"].any() and not R["i", "t"].any()
    torch.testing.assert_close(R["i", "i"][1], torch.eye(2, dtype=torch.float64))


def test_rollout_product_row_normalised():
    a0 = t([[0.5, 0.5], [0.0, 1.0]])
    a1 = t([[1.0, 0.0], [0.5, 0.5]])
    # M0 = (A0 + I) / rowsum = [[.75, .25], [0, 1]]; M1 = [[1, 0], [.25, .75]]; M1 M0 = [[.75, .25], [.1875, .8125]]
    torch.testing.assert_close(rollout_product([a0, a1]), t([[0.75, 0.25], [0.1875, 0.8125]]))
    # without the row normalisation: (A1 + I)(A0 + I) = [[2, 0], [.5, 1.5]] [[1.5, .5], [0, 2]]
    torch.testing.assert_close(rollout_product([a0, a1], normalize=False), t([[3.0, 1.0], [0.75, 3.25]]))
    assert rollout_product([]) is None


@pytest.mark.parametrize("fn", ["rbar", "bimodal"])
def test_rules_are_per_sample(fn):
    g = torch.Generator().manual_seed(0)
    R = torch.rand(3, 4, 4, generator=g, dtype=torch.float64) + torch.eye(4, dtype=torch.float64)
    Q = torch.rand(3, 5, 5, generator=g, dtype=torch.float64) + torch.eye(5, dtype=torch.float64)
    A = torch.rand(3, 4, 5, generator=g, dtype=torch.float64)
    RQ = torch.rand(3, 5, 4, generator=g, dtype=torch.float64)
    for b in range(3):
        if fn == "rbar":
            torch.testing.assert_close(rbar(R)[b:b + 1], rbar(R[b:b + 1]))
        else:
            full = bimodal_rule(R, Q, RQ, A)
            one = bimodal_rule(R[b:b + 1], Q[b:b + 1], RQ[b:b + 1], A[b:b + 1])
            torch.testing.assert_close(full[0][b:b + 1], one[0])
            torch.testing.assert_close(full[1][b:b + 1], one[1])
