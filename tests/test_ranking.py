"""Tie rules of the rankings (modules/ranking.py, issue 16): on hand-made
scores with tied groups each rule chooses exactly what it documents."""
import numpy as np
import pytest
import torch

from modules.ranking import (DEFAULT_TIE_BREAK, TIE_BREAKS, ranking_order, ranking_ranks, tie_permutation,
                             tied_share, top_k_indices, top_k_masks)

# 4 x 5 "map" with tied groups: 9 at two places, 5 at six, 2 at five, 0 at seven
HAND = torch.tensor([[5., 0., 9., 2., 5.],
                     [0., 2., 5., 0., 0.],
                     [5., 9., 2., 0., 5.],
                     [2., 0., 5., 2., 0.]]).reshape(1, -1)


def expected_order(values, descending, key):
    """Positions sorted by value (best first), ties by ``key(position)``."""
    sign = -1 if descending else 1
    return sorted(range(len(values)), key=lambda i: (sign * values[i], key(i)))


def perm_position(n, seed):
    perm = np.random.default_rng(seed).permutation(n)
    where = np.empty(n, dtype=np.int64)
    where[perm] = np.arange(n)
    return lambda i: int(where[i])


def test_default_rule_is_random():
    assert DEFAULT_TIE_BREAK == "random" and set(TIE_BREAKS) == {"random", "topk", "raster"}


@pytest.mark.parametrize("descending", [True, False])
def test_raster_chooses_lowest_index_among_ties(descending):
    values = HAND[0].tolist()
    order = ranking_order(HAND, descending, "raster")[0].tolist()
    assert order == expected_order(values, descending, key=lambda i: i)
    # written out for the positive direction: 9s at 2, 11; then 5s at 0, 4, 7, 10, 14, 17
    if descending:
        assert order[:8] == [2, 11, 0, 4, 7, 10, 14, 17]
    else:
        assert order[:7] == [1, 5, 8, 9, 13, 16, 19]  # the zeros, top rows first


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_random_follows_the_seeded_permutation(descending, seed):
    values = HAND[0].tolist()
    order = ranking_order(HAND, descending, "random", seed)[0].tolist()
    assert order == expected_order(values, descending, key=perm_position(len(values), seed))
    # all tied: the order is the permutation itself
    flat = torch.zeros(2, 20)
    perm = np.random.default_rng(seed).permutation(20).tolist()
    assert ranking_order(flat, descending, "random", seed).tolist() == [perm, perm]


def test_random_permutation_is_fixed_and_independent_of_global_state():
    torch.manual_seed(0)
    np.random.seed(0)
    a = tie_permutation(1000, 7)
    torch.manual_seed(1)
    np.random.seed(1)
    torch.rand(10)
    b = tie_permutation(1000, 7)
    assert torch.equal(a, b) and a.device.type == "cpu"
    assert sorted(a.tolist()) == list(range(1000))
    assert not torch.equal(a, tie_permutation(1000, 8))


def test_random_identical_across_runs_and_cpu_threads():
    g = torch.Generator().manual_seed(3)
    # two large maps with big tied regions (clamped at 0, quantised levels)
    scores = (torch.randn(2, 224 * 224, generator=g) * 4).round().clamp(min=0)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 4, 1):
            torch.set_num_threads(n)
            results.append((ranking_order(scores, True, "random", 5), ranking_order(scores, False, "random", 5),
                            top_k_masks(scores, [5017, 25088], True, "random", 5)))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(results[0], r))


@pytest.mark.parametrize("descending", [True, False])
def test_topk_is_what_torch_topk_returns(descending):
    for k in (0, 1, 3, 5, 8, 13, 20):
        got = top_k_indices(HAND, k, descending, "topk")
        ref = torch.topk(HAND if descending else -HAND, k, dim=-1).indices
        assert torch.equal(got, ref)
        mask = top_k_masks(HAND, [k], descending, "topk")[0, 0]
        assert set(torch.nonzero(mask).flatten().tolist()) == set(ref[0].tolist())


@pytest.mark.parametrize("rule", TIE_BREAKS)
@pytest.mark.parametrize("descending", [True, False])
def test_every_rule_chooses_a_valid_top_k(rule, descending):
    # whatever the tie order, the chosen set holds the k best values
    sign = 1 if descending else -1
    for k in range(21):
        mask = top_k_masks(HAND, [k], descending, rule, 4)[0, 0]
        assert int(mask.sum()) == k
        chosen = sorted((sign * HAND[0][mask]).tolist(), reverse=True)
        assert chosen == sorted((sign * HAND[0]).tolist(), reverse=True)[:k]


def test_without_ties_all_rules_agree():
    scores = torch.rand(3, 500, generator=torch.Generator().manual_seed(0))
    assert all(len(torch.unique(r)) == 500 for r in scores)
    ks = [0, 1, 50, 250, 499, 500]
    for descending in (True, False):
        ref = top_k_masks(scores, ks, descending, "raster")
        for rule in ("random", "topk"):
            assert torch.equal(top_k_masks(scores, ks, descending, rule, 9), ref)
        assert torch.equal(ranking_order(scores, descending, "random", 9), ranking_order(scores, descending, "raster"))
        for m in ref:
            assert torch.all(tied_share(scores, m) == 0)


def test_ranks_invert_the_order():
    for rule in ("random", "raster"):
        order = ranking_order(HAND, True, rule, 2)
        ranks = ranking_ranks(HAND, True, rule, 2)
        assert torch.equal(ranks[0][order[0]], torch.arange(20))


def test_random_is_batch_invariant():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 3, (5, 40), generator=g).float()
    full = ranking_order(scores, True, "random", 0)
    assert torch.equal(full, torch.cat([ranking_order(scores[b:b + 1], True, "random", 0) for b in range(5)]))


def test_tied_share_counts_removed_pixels_tied_with_a_kept_one():
    scores = torch.tensor([[2., 1., 1., 1., 0.]])
    share = [float(tied_share(scores, m)[0]) for m in top_k_masks(scores, [0, 1, 2, 3, 4, 5], True, "raster")]
    # k=2: {2, one 1} of which the 1 is tied with kept 1s; k=3: two of three 1s; k=4: all 1s chosen, none kept
    assert share == pytest.approx([0.0, 0.0, 0.5, 2 / 3, 0.0, 0.0])
    neg = [float(tied_share(scores, m)[0]) for m in top_k_masks(scores, [1, 2, 3], False, "raster")]
    assert neg == pytest.approx([0.0, 0.5, 2 / 3])  # {0, 1}: one of three 1s; {0, 1, 1}: two of them
    # the published loop's sets (topk) are scored the same way
    topk = top_k_masks(HAND, [4], True, "topk")[0]  # 9, 9 and two of the six 5s
    assert float(tied_share(HAND, topk)[0]) == pytest.approx(0.5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tie_break"):
        ranking_order(HAND, True, "stable")
    with pytest.raises(ValueError, match="per k"):
        ranking_order(HAND, True, "topk")
    with pytest.raises(ValueError, match="NaN"):
        top_k_indices(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="k must"):
        top_k_masks(HAND, [21])
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        ranking_order(HAND[0])
