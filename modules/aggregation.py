"""The method-independent pieces of math, each written once.

Head averaging (Eq. 5 of the ICCV paper and the plain mean), the residual
identity and row normalisation of rollout, the rollout product, attention
GradCAM's head weights, min-max normalisation (plain and over a mask) and
the start-layer check.  :mod:`modules.methods` (single streams, along
:func:`modules.trace.propagate_row`) and :mod:`modules.iccv` (coupled
streams, whole relevance matrices) are built from these; nothing else in
``modules/`` re-states them.

Pure, batched tensor functions: every reduction names its dimension, none
crosses the batch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["head_mean", "positive_head_mean", "add_identity", "row_normalize", "rollout_product", "gradcam_map",
           "minmax_normalize", "masked_min", "masked_minmax", "check_start_layer"]


def head_mean(maps: Tensor) -> Tensor:
    """Mean over heads: (B, H, Nq, Nk) -> (B, Nq, Nk)."""
    return maps.mean(dim=1)


def positive_head_mean(weighted: Tensor) -> Tensor:
    """Abar = mean over heads of max(weighted, 0): (B, H, Nq, Nk) -> (B, Nq, Nk)
    (ICCV 2021 Eq. 5).

    With ``weighted = grad * Rattn`` this is transformer attribution's
    per-layer map; with ``grad * A`` the generic method's.  Callers write the
    product as ``grad * A`` (the published order; the product is exact either
    way, the order is kept so maps stay bit for bit).
    """
    return weighted.clamp(min=0).mean(dim=1)


def add_identity(m: Tensor) -> Tensor:
    """I + M for (B, N, N) M (the residual connection)."""
    return m + torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)


def row_normalize(m: Tensor) -> Tensor:
    """Divide each row by its sum (rows of attention with residual sum to 1)."""
    return m / m.sum(dim=-1, keepdim=True)


def rollout_product(maps: Sequence[Tensor], normalize: bool = True) -> Optional[Tensor]:
    """M_n ... M_0 with M = row-normalised (A + I) for head-mean attention maps
    ``maps`` (B, N, N) in forward order (rollout, Abnar & Zuidema 2020);
    ``normalize=False``: M = A + I.  None for no maps.

    Single streams evaluate only the explained row of this product
    (:func:`modules.trace.propagate_row`); coupled streams need it whole
    (:func:`modules.iccv.coupled_rollout`).
    """
    joint = None
    for a in maps:
        m = add_identity(a)
        if normalize:
            m = row_normalize(m)
        joint = m if joint is None else torch.bmm(m, joint)
    return joint


def gradcam_map(probs: Tensor, grad: Tensor, pair: Tensor) -> Tensor:
    """Attention GradCAM over a whole map (METHODS.md section 3,
    METHODS_ICCV.md section 2): w_h = mean of grad_h over the entries where
    ``pair`` (B, 1, Nq, Nk), bool or 0/1, holds; max(mean_h w_h A_h, 0)
    (the clamp after the head mean).  (B, H, Nq, Nk) -> (B, Nq, Nk)."""
    w = (grad * pair).sum(dim=(2, 3), keepdim=True) / pair.sum(dim=(2, 3), keepdim=True)
    return (w * probs).mean(dim=1).clamp(min=0)


def minmax_normalize(maps: Tensor) -> Tensor:
    """Per-sample min-max to [0, 1] over every non-batch dimension; a constant
    map (or one holding NaN) becomes 0."""
    return masked_minmax(maps, None)


def masked_min(x: Tensor, mask: Tensor) -> Tensor:
    """Per-sample minimum of ``x`` over the entries where ``mask`` is True, (B,)."""
    return x.masked_fill(~mask, float("inf")).flatten(1).amin(dim=1)


def masked_minmax(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Per-sample min-max normalisation to [0, 1] over the entries where
    ``mask`` (shaped as ``x``, or broadcasting to it) is True, every entry
    when ``mask`` is None; a constant map, or one holding NaN or an infinity,
    becomes 0, entries outside the mask become 0.  The one min-max of the
    project."""
    if mask is None:
        lo = x.flatten(1).amin(dim=1)
        hi = x.flatten(1).amax(dim=1)
    else:
        lo = masked_min(x, mask)
        hi = -masked_min(-x, mask)
    shape = (-1,) + (1,) * (x.dim() - 1)
    span = (hi - lo).reshape(shape)
    out = torch.where(span > 0, (x - lo.reshape(shape)) / span, torch.zeros_like(x))
    out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out if mask is None else out.masked_fill(~mask, 0.0)


def check_start_layer(start_layer: Optional[int], depth: int, what: str = "start_layer") -> None:
    """The one start-layer check: an int in 0 .. depth-1 (None is always fine)."""
    if start_layer is None:
        return
    if isinstance(start_layer, bool) or not isinstance(start_layer, int):
        raise ValueError(f"{what}={start_layer!r} is not an integer")
    if not 0 <= start_layer < depth:
        raise ValueError(f"{what}={start_layer} outside 0..{depth - 1}")
