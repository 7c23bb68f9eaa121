"""Adapters for timm models, unmodified.

* :class:`TimmViTAdapter`: ``VisionTransformer`` (ViT, DeiT, DeiT III, with
  or without a class token, with register tokens; ``global_pool`` ``token``,
  ``avg`` or ``map``), ``VisionTransformerDistilled`` (distilled DeiT),
  ``Eva`` (EVA, EVA-02) and ``Beit``.  Each block's attention module
  computes its probabilities on its unfused path and passes them through
  ``attn_drop`` right after the softmax: that module's output is recorded.
  The ``map`` head (``AttentionPoolLatent``, one learned query) computes its
  softmax inline, so inside the context it runs a recording copy of its
  forward (a scoped instance attribute, deleted on exit).

Which row is explained (METHODS.md section 8, the project's own definition
beyond the papers): ``token`` pooling reads token 0 ([CLS]; a distilled DeiT
too, as METHODS.md section 2 says); ``avg`` the mean of the rows of the
pooled tokens (the tokens after the prefix unless the model pools them
too); ``map`` the pooling query's attention, as a cross-attention from a
one-token stream.  Prefix tokens (class, distillation, registers) take part
in the propagation and are dropped from the map at the read-out.

Image sizes: every size the model takes.  The map is on the grid the
model's patch embedding gives (it floors a size that is no multiple of the
patch, or pads it with ``dynamic_img_pad=True``), and the read-out states
the pixels that grid covers (:mod:`modules.adapters.patch_grid`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from modules.adapters import (UnsupportedModelError, column_mask, feed_dict, model_device, one_hot_rows,
                              register_adapter)
from modules.adapters.hooks import HookAdapter
from modules.adapters.patch_grid import patch_grid
from modules.attention_capture import AttentionLayer
from modules.trace import AttentionCall, Readout, Stream

__all__ = ["TimmViTAdapter"]


def _vit_classes() -> Tuple[type, ...]:
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer, Eva, Beit


def _attention_pool_forward(module: nn.Module, record, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    """timm ``AttentionPoolLatent.forward`` (timm 1.0), computing the softmax
    explicitly and recording it: same result, probabilities with their graph."""
    B, N, C = x.shape
    if module.pos_embed is not None:
        x = x + module.pos_embed.unsqueeze(0).to(x.dtype)
    q_latent = module.latent.expand(B, -1, -1)
    q = module.q(q_latent).reshape(B, module.latent_len, module.num_heads, module.head_dim).transpose(1, 2)
    kv = module.kv(x).reshape(B, N, 2, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    attn = (q * module.scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        attn = attn + attn_mask
    attn = attn.softmax(dim=-1)
    record(attn)
    x = (attn @ v).transpose(1, 2).reshape(B, module.latent_len, C)
    x = module.proj_drop(module.proj(x))
    if module.mlp is not None:
        x = x + module.mlp(module.norm(x))
    if module.pool == "token":
        x = x[:, 0]
    elif module.pool == "avg":
        x = x.mean(1)
    return x


@register_adapter
class TimmViTAdapter(HookAdapter):
    lrp = True  # every LRP method through the scope (modules.lrp_scope)
    family = "timm ViT family (unmodified)"
    examples = ("VisionTransformer (token/avg/map pooling, registers, no class token)", "DeiT", "DeiT III",
                "VisionTransformerDistilled", "Eva (EVA, EVA-02)", "Beit")
    library = "timm"
    notes = "avg/map pooling: METHODS.md section 8 (ours)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, _vit_classes())

    def __init__(self, model: nn.Module):
        super().__init__(model)
        name = type(model).__name__
        if not isinstance(getattr(model, "head", None), nn.Linear):
            raise UnsupportedModelError(f"{name}: no classification head (num_classes=0); explain a classifier")
        pool = getattr(model, "global_pool", "token")
        if getattr(model, "attn_pool", None) is not None:
            pool = "map"
        if pool not in ("token", "avg", "map"):
            raise UnsupportedModelError(f"{name}: global_pool={pool!r} is not supported (token, avg, map are)")
        self.pool = pool
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.pool_prefix = bool(getattr(model, "pool_include_prefix", False))

    def attention_layers(self) -> List[AttentionLayer]:
        layers = []
        for i, block in enumerate(self.model.blocks):
            attn = getattr(block, "attn", None)
            drop = getattr(attn, "attn_drop", None)
            if not isinstance(drop, nn.Module) or not hasattr(attn, "fused_attn"):
                raise UnsupportedModelError(f"{type(self.model).__name__}: blocks[{i}].attn is "
                                            f"{type(attn).__name__}, without the attn_drop module after its softmax")
            layers.append(AttentionLayer(f"blocks.{i}.attn", attn, drop, None))
        if self.pool == "map":
            pool = self.model.attn_pool
            layers.append(AttentionLayer("attn_pool", pool, pool, None, cross=True, forward=_attention_pool_forward))
        return layers

    def stream_of(self, name: str) -> str:
        return "image"

    def prepare(self, inputs: Any, index: Any) -> Dict[str, Any]:
        """The grid and its pixel extent as the model's own patch embedding
        gives them (:mod:`modules.adapters.patch_grid`: it floors, or pads
        with ``dynamic_img_pad``; ``dynamic_img_size`` resamples the position
        embeddings to that grid)."""
        feed = feed_dict(inputs, "pixel_values", model_device(self.model))
        pe = self.model.patch_embed
        patch = pe.patch_size
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        feed["grid"], feed["_extent"] = patch_grid(pe, getattr(pe, "proj", None), feed["pixel_values"], patch,
                                                   type(self.model).__name__)
        return feed

    def forward(self, feed, method):
        return self.model(feed["pixel_values"])

    def streams(self, feed, cap) -> Dict[str, Stream]:
        calls = []
        for r in cap.records:
            if r.name == "attn_pool":
                offset = 0 if self.pool_prefix else self.prefix
                calls.append(AttentionCall(r.name, r.probs, "pool", "image", key_offset=offset))
            else:
                calls.append(AttentionCall(r.name, r.probs, "image", "image"))
        first = calls[0].probs
        B, N = first.shape[0], first.shape[-1]
        gh, gw = feed["grid"]
        if N != self.prefix + gh * gw:
            raise RuntimeError(f"{type(self.model).__name__}: {N} tokens do not split into {self.prefix} prefix "
                               f"tokens and a {gh}x{gw} patch grid")
        device, dtype = first.device, first.dtype
        pooled_from = 0 if self.pool_prefix else self.prefix
        if self.pool == "token":
            weights = one_hot_rows(B, N, 0, device, dtype)
        elif self.pool == "avg":
            weights = torch.zeros(B, N, dtype=dtype, device=device)
            weights[:, pooled_from:] = 1.0 / (N - pooled_from)
        else:  # map: the read-out is the pooling query (one token)
            weights = torch.ones(B, 1, dtype=dtype, device=device)
        readout = Readout(weights, column_mask(B, N, self.prefix, device), grid=(gh, gw),
                          pixel_extent=feed["_extent"])
        return {"image": Stream("image", calls, readout)}
