"""Method-independent pieces: head averaging and attention rollout.

Pure, batched tensor functions over lists of per-layer (B, H, N, N) or
(B, N, N) maps; every reduction names its dimension, none crosses the batch.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["head_mean", "positive_head_mean", "add_identity", "row_normalize", "rollout", "rollout_row", "minmax_normalize"]


def head_mean(maps: Tensor) -> Tensor:
    """Mean over heads: (B, H, N, N) -> (B, N, N)."""
    return maps.mean(dim=1)


def positive_head_mean(weighted: Tensor) -> Tensor:
    """Abar = mean over heads of max(weighted, 0): (B, H, N, N) -> (B, N, N).

    With ``weighted = grad * Rattn`` this is transformer attribution's
    per-layer map; with ``grad * A`` the generic method's.
    """
    return weighted.clamp(min=0).mean(dim=1)


def add_identity(m: Tensor) -> Tensor:
    """I + M for (B, N, N) M (the residual connection)."""
    return m + torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def row_normalize(m: Tensor) -> Tensor:
    """Divide each row by its sum (rows of attention with residual sum to 1)."""
    return m / m.sum(dim=-1, keepdim=True)


def rollout(matrices: Sequence[Tensor], start_layer: int = 0) -> Tensor:
    """M_{L-1} @ ... @ M_s for (B, N, N) matrices M_0 .. M_{L-1}; s = start_layer."""
    _check_start(matrices, start_layer)
    joint = matrices[start_layer]
    for m in matrices[start_layer + 1:]:
        joint = torch.bmm(m, joint)
    return joint


def rollout_row(matrices: Sequence[Tensor], row: int = 0, start_layer: int = 0) -> Tensor:
    """Row ``row`` of :func:`rollout`, (B, N), in O(L N^2) instead of O(L N^3):
    e_row^T M_{L-1} ... M_s evaluated from the left."""
    _check_start(matrices, start_layer)
    r = matrices[-1][:, row]
    for m in reversed(matrices[start_layer:-1]):
        r = torch.bmm(r.unsqueeze(1), m).squeeze(1)
    return r


def minmax_normalize(maps: Tensor) -> Tensor:
    """Per-sample min-max to [0, 1] over every non-batch dimension; a constant
    map (or NaN) becomes 0."""
    flat = maps.flatten(1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    out = (flat - lo) / (hi - lo)
    out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out.reshape(maps.shape)


def _check_start(matrices: Sequence[Tensor], start_layer: int) -> None:
    if not 0 <= start_layer < len(matrices):
        raise ValueError(f"start_layer={start_layer} outside 0..{len(matrices) - 1}")
