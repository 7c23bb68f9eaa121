"""Rankings with an explicit rule for ties (../shared/METHODS.md section 5,
METHODS_ICCV.md section 6; issue 16).

The benchmarks rank items by relevance and keep or remove the first ``k``:
pixels in the perturbation test, words in the ERASER rationale test, tokens
and boxes in the VQA perturbation test.  Many maps hold large regions of
exactly equal values (clamped at 0, or bilinear upsampling of equal patches),
so the order *among tied items* decides which ones go first.  Every ranking
here takes one of three documented rules:

``random`` (the default)
    Tied items are ordered by a fixed, seeded random permutation of the
    positions, drawn on the CPU with NumPy's ``default_rng(seed)`` so that the
    result is the same on every device, thread count and run.  Among tied
    items, the one that comes earlier in ``tie_permutation(n, seed)`` goes
    first.  The permutation depends only on ``n`` and the seed (one
    permutation for every row of a batch).
``topk``
    ``torch.topk`` on the scores (negated when the smallest go first), as the
    published evaluation loops do; among ties, whatever the device's kernel
    returns.  A top-``k`` set is computed independently for each ``k`` (the
    set for a smaller ``k`` need not lie inside the set for a larger one).
``raster``
    The lower position first (a stable sort): for images the top rows first,
    for text the earlier word.

All functions take ``(B, N)`` scores (one row per sample) and follow the
scores' device.  Scores must not hold NaN.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TIE_BREAKS",
    "DEFAULT_TIE_BREAK",
    "DEFAULT_TIE_SEED",
    "check_tie_break",
    "tie_permutation",
    "ranking_order",
    "ranking_ranks",
    "top_k_indices",
    "top_k_masks",
    "tied_share",
]

#: The tie rules, default first.
TIE_BREAKS: Tuple[str, ...] = ("random", "topk", "raster")
DEFAULT_TIE_BREAK = "random"
DEFAULT_TIE_SEED = 0


def check_tie_break(tie_break: str) -> str:
    """``tie_break`` if it is one of :data:`TIE_BREAKS`, else ``ValueError``."""
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break must be one of {TIE_BREAKS}, not {tie_break!r}")
    return tie_break


def _check_scores(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, N), not {tuple(scores.shape)}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise ValueError("scores hold NaN: a ranking of them is undefined")


def tie_permutation(n: int, seed: int = DEFAULT_TIE_SEED) -> Tensor:
    """The ``random`` rule's permutation of the positions ``0 .. n-1``.

    ``np.random.default_rng(seed).permutation(n)`` as a CPU long tensor:
    independent of the device, the thread count and torch's global random
    state.  Among tied items, the one earlier in this permutation goes first.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, not {n}")
    return torch.from_numpy(np.random.default_rng(int(seed)).permutation(int(n)).astype(np.int64))


def ranking_order(scores: Tensor, descending: bool = True, tie_break: str = DEFAULT_TIE_BREAK,
                  seed: int = DEFAULT_TIE_SEED) -> Tensor:
    """Positions in the order they are chosen: (B, N) scores -> (B, N) long.

    ``order[b, 0]`` is chosen first: the highest score when ``descending``,
    else the lowest.  Ties follow ``tie_break`` (``random`` or ``raster``;
    ``topk`` defines no total order: use :func:`top_k_indices` or
    :func:`top_k_masks`).
    """
    _check_scores(scores)
    check_tie_break(tie_break)
    if tie_break == "topk":
        raise ValueError("the topk rule gives a set per k, not one order; use top_k_indices or top_k_masks")
    if tie_break == "raster":
        return torch.sort(scores, dim=1, descending=descending, stable=True).indices
    perm = tie_permutation(scores.shape[1], seed).to(scores.device)
    idx = torch.sort(scores[:, perm], dim=1, descending=descending, stable=True).indices
    return perm[idx]


def ranking_ranks(scores: Tensor, descending: bool = True, tie_break: str = DEFAULT_TIE_BREAK,
                  seed: int = DEFAULT_TIE_SEED) -> Tensor:
    """Rank of every position (0 = chosen first): (B, N) scores -> (B, N) long.

    The inverse of :func:`ranking_order`: the first ``k`` chosen are exactly
    the positions with ``rank < k``.
    """
    order = ranking_order(scores, descending, tie_break, seed)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def top_k_indices(scores: Tensor, k: int, descending: bool = True, tie_break: str = DEFAULT_TIE_BREAK,
                  seed: int = DEFAULT_TIE_SEED) -> Tensor:
    """The ``k`` positions chosen first, in order: (B, N) scores -> (B, k) long.

    ``topk``: ``torch.topk(scores, k)`` (``torch.topk(-scores, k)`` when not
    ``descending``), literally as the published loops call it.  Otherwise the
    first ``k`` of :func:`ranking_order`.
    """
    _check_scores(scores)
    check_tie_break(tie_break)
    n = scores.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in 0..{n}, not {k}")
    if tie_break == "topk":
        return torch.topk(scores if descending else -scores, k, dim=-1).indices
    return ranking_order(scores, descending, tie_break, seed)[:, :k]


def top_k_masks(scores: Tensor, ks: Sequence[int], descending: bool = True, tie_break: str = DEFAULT_TIE_BREAK,
                seed: int = DEFAULT_TIE_SEED) -> Tensor:
    """The chosen positions for each ``k`` as masks: (B, N) -> (len(ks), B, N) bool.

    ``random`` and ``raster`` sort once (the sets are nested); ``topk`` calls
    ``torch.topk`` once per ``k``, as the published loop does.
    """
    _check_scores(scores)
    check_tie_break(tie_break)
    B, n = scores.shape
    for k in ks:
        if not 0 <= k <= n:
            raise ValueError(f"k must lie in 0..{n}, not {k}")
    masks = torch.zeros(len(ks), B, n, dtype=torch.bool, device=scores.device)
    if tie_break == "topk":
        for s, k in enumerate(ks):
            masks[s].scatter_(1, top_k_indices(scores, k, descending, "topk"), True)
        return masks
    ranks = ranking_ranks(scores, descending, tie_break, seed)
    for s, k in enumerate(ks):
        masks[s] = ranks < k
    return masks


def tied_share(scores: Tensor, chosen: Tensor) -> Tensor:
    """Share of the chosen positions that the tie rule picked: (B, N), (B, N) bool -> (B,) float.

    A chosen position counts as *tied* when an unchosen position has the same
    score: the rule chose between them, so another rule could have chosen
    differently.  For a top-``k`` or bottom-``k`` choice (any rule) only the
    boundary score can be shared.  0 when nothing is chosen.  This is how much
    the rule can matter for a map at a given ``k``.
    """
    _check_scores(scores)
    if chosen.shape != scores.shape or chosen.dtype != torch.bool:
        raise ValueError(f"chosen must be a bool tensor of shape {tuple(scores.shape)}")
    inf = torch.tensor(float("inf"), dtype=scores.dtype if scores.is_floating_point() else torch.float64,
                       device=scores.device)
    values = scores.to(inf.dtype)
    lo = torch.where(chosen, values, inf).amin(dim=1, keepdim=True)
    hi = torch.where(chosen, values, -inf).amax(dim=1, keepdim=True)
    kept_lo = (~chosen & (values == lo)).any(dim=1, keepdim=True)
    kept_hi = (~chosen & (values == hi)).any(dim=1, keepdim=True)
    tied = chosen & (((values == lo) & kept_lo) | ((values == hi) & kept_hi))
    count = chosen.sum(dim=1)
    return torch.where(count > 0, tied.sum(dim=1).to(inf.dtype) / count.clamp(min=1), torch.zeros_like(lo[:, 0]))
