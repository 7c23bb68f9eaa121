"""Relevance maps for a :class:`~baselines.ViT.ViT_LRP.VisionTransformer`.

``explain(model, images, method)`` implements every method of
../shared/METHODS.md section 2 for a batch, on the images' device.  Method
names come from :mod:`modules.methods`.
"""
from __future__ import annotations


from torch import Tensor

from modules.aggregation import minmax_normalize
from modules.explain import explain as _explain
from modules.explain import upsample
from modules.methods import METHOD_CHOICES, METHOD_NAMES, Index, resolve_index

__all__ = ["explain", "resolve_index", "upsample", "normalize", "METHOD_CHOICES", "METHOD_NAMES"]


def explain(model, images: Tensor, method: str, index: Index = None, start_layer: int = 0) -> Tensor:
    """Relevance of each image patch (or pixel, for ``lrp``) for class ``index``.

    A thin wrapper of :func:`modules.explain.explain` kept for existing code.

    Parameters
    ----------
    model:
        A :class:`~baselines.ViT.ViT_LRP.VisionTransformer` (or any model
        :func:`modules.explain.explain` supports).
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
    return _explain(model, images, method, index=index, start_layer=start_layer)


def normalize(maps: Tensor) -> Tensor:
    """Per-sample min-max normalisation to [0, 1] (constant maps become 0)."""
    return minmax_normalize(maps)
