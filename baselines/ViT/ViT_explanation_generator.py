"""Relevance maps for a :class:`~baselines.ViT.ViT_LRP.VisionTransformer`.

``explain(model, images, method)`` implements every method of
../shared/METHODS.md section 2 for a batch, on the images' device.  Method
names come from :mod:`modules.methods`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.aggregation import (add_identity, head_mean, minmax_normalize, positive_head_mean, rollout_row,
                                 row_normalize)
from modules.methods import METHOD_CHOICES, METHOD_NAMES, Index, resolve_index, resolve_method
from modules.recording import record

__all__ = ["explain", "resolve_index", "upsample", "normalize", "METHOD_CHOICES", "METHOD_NAMES"]

def explain(model, images: Tensor, method: str, index: Index = None, start_layer: int = 0) -> Tensor:
    """Relevance of each image patch (or pixel, for ``lrp``) for class ``index``.

    Parameters
    ----------
    model:
        A :class:`~baselines.ViT.ViT_LRP.VisionTransformer` in eval mode.
    images:
        (B, C, H, W), normalised as the model expects; H and W multiples of
        the patch size.
    method:
        A name from :data:`modules.methods.METHOD_CHOICES`.
    index:
        None (each sample's predicted class), an int, or one class per sample.
    start_layer:
        First block of the rollout (transformer_attribution,
        generic_attribution, rollout); the evaluation scripts use 1.

    Returns
    -------
    Tensor
        Raw (unnormalised) relevance, (B, gh, gw); (B, H, W) for ``lrp``.
        ``attn_gradcam`` is min-max normalised per sample, as specified.
    """
    m = resolve_method(method)
    depth = len(model.blocks)
    if not 0 <= start_layer < depth:
        raise ValueError(f"start_layer={start_layer} outside 0..{depth - 1}")
    B = images.shape[0]
    gh, gw = model.grid_size(images)
    p = model.num_prefix_tokens  # patch columns start here (2 for distilled DeiT)
    last = depth - 1

    def forward() -> Tensor:
        x = images.detach()
        return model(x.requires_grad_(True) if m.needs_grad else x)  # a leaf: frozen models work too

    def relprop(R: Tensor, stop: Optional[int]) -> Optional[Tensor]:
        return model.relprop(R, stop_block=stop, image_size=tuple(images.shape[-2:]))

    rec = record(m, forward, relprop, depth, start_layer, index)
    attn, grads, rel = rec.attentions, rec.grads, rec.relevance
    with torch.no_grad():
        if m.name == "transformer_attribution":
            mats = [add_identity(positive_head_mean(grads[i] * rel[i])) for i in range(start_layer, depth)]
            cam = rollout_row(mats, row=0)[:, p:]
        elif m.name == "generic_attribution":
            mats = [add_identity(positive_head_mean(grads[i] * attn[i])) for i in range(start_layer, depth)]
            cam = rollout_row(mats, row=0)[:, p:]
        elif m.name == "rollout":
            mats = [row_normalize(add_identity(head_mean(attn[i]))) for i in range(start_layer, depth)]
            cam = rollout_row(mats, row=0)[:, p:]
        elif m.name == "attn_last_layer":
            cam = attn[last].clamp(min=0).mean(dim=1)[:, 0, p:]
        elif m.name == "attn_gradcam":
            a = attn[last][:, :, 0, p:]  # (B, H, patches)
            w = grads[last][:, :, 0, p:].mean(dim=-1, keepdim=True)  # (B, H, 1)
            cam = minmax_normalize((w * a).mean(dim=1).clamp(min=0))
        elif m.name == "lrp_last_layer":
            cam = rel[last].clamp(min=0).mean(dim=1)[:, 0, p:]
        elif m.name == "lrp":
            return rec.input_relevance.sum(dim=1)
        else:  # pragma: no cover - the registry and this table move together
            raise NotImplementedError(m.name)
    return cam.reshape(B, gh, gw).detach()


def upsample(maps: Tensor, size: Tuple[int, int]) -> Tensor:
    """Bilinear upsampling of (B, h, w) maps to (B, *size)."""
    maps = maps.unsqueeze(1)
    if not maps.is_floating_point():
        maps = maps.float()
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)


def normalize(maps: Tensor) -> Tensor:
    """Per-sample min-max normalisation to [0, 1] (constant maps become 0)."""
    return minmax_normalize(maps)
