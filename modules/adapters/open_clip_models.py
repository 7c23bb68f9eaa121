"""open_clip image-text models, unmodified (``open-clip-torch``).

``open_clip.CLIP`` and ``open_clip.CustomTextCLIP`` whose towers are
open_clip's own ``VisionTransformer`` and ``TextTransformer``, with either
attention kind open_clip builds: ``nn.MultiheadAttention`` (the default
blocks, and every OpenAI / LAION checkpoint) or open_clip's ``Attention``
(``CustomResidualAttentionBlock``: qk-norm, head scaling, inner norm).
Neither exposes its probabilities (the first is one fused
``F.multi_head_attention_forward`` call, the second calls
``scaled_dot_product_attention``), so inside the recording context each
attention module runs a recording forward (a scoped instance attribute,
deleted on exit): the same computation with the softmax explicit
(:func:`modules.mha.mha_module_forward`, :func:`open_clip_attention_forward`).
No fork, no ``attn_probs`` attribute, nothing left on the model.

What is explained is what Hugging Face CLIP's adapter explains
(:func:`modules.adapters.hf_models.image_text_streams`): the contrastive
logit ``logit_scale * <image features, text features> (+ logit_bias)`` of
each (image, text) pair, image i with text i by default (``index=``: the
text for each image); the image map reads [CLS] (``pool_type="tok"``) or
the mean of the patch rows (``"avg"``), the text map the token the text
tower pools (``"argmax"``: the highest id, CLIP's EOT; ``"eos"``, ``"first"``,
``"last"``).  A causal text tower's real tokens are those up to the pooled
one (the padding after it is never seen by it).  ``clip_convention="published"``
gives the published CLIP notebook's maps (METHODS_ICCV.md section 5), which
was written for this very architecture (OpenAI's ``clip`` package).

Inputs: ``{"image": (B, 3, H, W), "text": (B, context_length) ids}`` (the
arguments of the model's ``forward``), or the tuple ``(image, text)``.
Every LRP method runs through the LRP scope (METHODS.md section 10).
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.adapters import (InputsError, UnsupportedModelError, check_images, model_device, one_hot_rows,
                              register_adapter)
from modules.adapters.hf_models import check_clip_convention, image_text_streams, pairs
from modules.adapters.hooks import HookAdapter
from modules.attention_capture import AttentionLayer
from modules.mha import mha_module_forward
from modules.trace import AttentionCall

__all__ = ["OpenClipAdapter", "open_clip_attention_forward"]


def open_clip_attention_forward(module: nn.Module, record, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    """open_clip ``Attention.forward`` (open_clip 3.x, its
    ``scaled_dot_product_attention`` path) with the softmax explicit and
    recorded; a float mask's ``-inf`` entries are applied as a ``masked_fill``."""
    N, L, C = x.shape
    H = module.num_heads
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(N, L, H, -1).transpose(1, 2) for t in (q, k, v))
    blocked = None
    if attn_mask is not None:
        if attn_mask.ndim == 3:
            attn_mask = attn_mask.reshape(N, H, L, L)
        if attn_mask.dtype == torch.bool:  # open_clip: True = masked
            blocked, attn_mask = attn_mask, None
        else:
            blocked = torch.isneginf(attn_mask)
            attn_mask = attn_mask.to(q.dtype).masked_fill(blocked, 0.0)
            if not bool(attn_mask.any()):
                attn_mask = None
    q, k = module.ln_q(q), module.ln_k(k)
    attn = (q @ k.transpose(-2, -1)) * module.scale
    if attn_mask is not None:
        attn = attn + attn_mask
    if blocked is not None and bool(blocked.any()):
        attn = attn.masked_fill(blocked, float("-inf"))
    attn = attn.softmax(dim=-1)
    record(attn)
    x = module.attn_drop(attn) @ v
    if module.head_scale is not None:
        x = x * module.head_scale
    x = x.transpose(1, 2).reshape(N, L, C)
    x = module.ln_inner(x)
    return module.out_drop(module.out_proj(x))


def _open_clip():
    import open_clip.model as model
    import open_clip.transformer as transformer

    return model, transformer


@register_adapter
class OpenClipAdapter(HookAdapter):
    lrp = True  # every LRP method through the scope (modules.lrp_scope)
    family = "open_clip image-text models (unmodified)"
    examples = ("CLIP", "CustomTextCLIP")
    library = "open_clip"
    notes = ("ViT towers, nn.MultiheadAttention or open_clip Attention blocks; explains the contrastive logit of "
             "each (image, text) pair as for Hugging Face CLIP; two maps (image, text); "
             "clip_convention='published' (METHODS_ICCV.md section 5)")
    options = ("clip_convention",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if "open_clip" not in sys.modules:  # an open_clip model implies open_clip was imported
            return False
        oc, _ = _open_clip()
        return isinstance(model, (oc.CLIP, oc.CustomTextCLIP))

    def __init__(self, model: nn.Module):
        super().__init__(model)
        oc, tr = _open_clip()
        name = type(model).__name__
        visual = model.visual
        if not isinstance(visual, tr.VisionTransformer):
            raise UnsupportedModelError(f"open_clip {name}: vision tower {type(visual).__name__} is not open_clip's "
                                        "VisionTransformer (timm and ResNet towers are not supported)")
        if visual.attn_pool is not None:
            raise UnsupportedModelError(f"open_clip {name}: an attentional-pool vision tower is not supported")
        if visual.pool_type not in ("tok", "avg"):
            raise UnsupportedModelError(f"open_clip {name}: vision pool_type={visual.pool_type!r} is not supported")
        if isinstance(model, oc.CustomTextCLIP):
            text = model.text
            if not isinstance(text, tr.TextTransformer):
                raise UnsupportedModelError(f"open_clip {name}: text tower {type(text).__name__} is not open_clip's "
                                            "TextTransformer (Hugging Face text towers are not supported)")
            if text.cls_emb is not None or text.use_pad_mask:
                raise UnsupportedModelError(f"open_clip {name}: a text tower with a class token or padding mask "
                                            "(CoCa-style) is not supported")
            self.text_prefix, self.embedding = "text.", text.token_embedding
            self.pool_type, self.eos_id, self.causal = text.pool_type, text.eos_id, text.attn_mask is not None
            self.context = text.context_length
        else:
            self.text_prefix, self.embedding = "", model.token_embedding
            self.pool_type, self.eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)
            self.causal, self.context = model.attn_mask is not None, model.context_length
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise UnsupportedModelError(f"open_clip {name}: text pool_type={self.pool_type!r} is not supported")
        for layer in self.layers:
            if type(layer.module).__name__ == "Attention" and layer.module.logit_scale is not None:
                raise UnsupportedModelError(f"open_clip {name}: scaled cosine attention ({layer.name}) is not "
                                            "supported (open_clip's own forward fails on it)")

    def configure(self, **options: Any) -> None:
        check_clip_convention(options.get("clip_convention", "hf"), type(self.model).__name__, True)
        super().configure(**options)

    def attention_layers(self) -> List[AttentionLayer]:
        _, tr = _open_clip()
        layers = []
        for name, module in self.model.named_modules():
            if isinstance(module, nn.MultiheadAttention):
                layers.append(AttentionLayer(name, module, module, None, forward=mha_module_forward))
            elif isinstance(module, tr.Attention):
                layers.append(AttentionLayer(name, module, module, None, forward=open_clip_attention_forward))
        if not layers:
            raise UnsupportedModelError(f"open_clip {type(self.model).__name__}: no attention modules found")
        return layers

    def stream_of(self, name: str) -> str:
        return "image" if name.startswith("visual.") else "text"

    def input_embeddings(self) -> nn.Module:
        return self.embedding

    def encoder_input_module(self) -> Optional[nn.Module]:
        return None  # the position embedding is added inline: full LRP reads the word embeddings

    def prepare(self, inputs: Any, index: Any) -> Dict[str, Any]:
        what = f"open_clip {type(self.model).__name__}"
        if isinstance(inputs, Mapping):
            image, text = inputs.get("image"), inputs.get("text")
        elif isinstance(inputs, (tuple, list)) and len(inputs) == 2:
            image, text = inputs
        else:
            raise InputsError(f"{what} needs {{'image': images, 'text': token ids}} or the tuple (images, ids)")
        if not isinstance(image, Tensor) or not isinstance(text, Tensor):
            raise InputsError(f"{what} needs an 'image' tensor (B, 3, H, W) and a 'text' tensor of token ids (B, T)")
        device = model_device(self.model)
        image, text = image.to(device), text.to(device)
        visual = self.model.visual
        grid = check_images(image, tuple(visual.patch_size), what)
        if tuple(grid) != tuple(visual.grid_size):
            raise InputsError(f"{what}: images are {image.shape[-2]}x{image.shape[-1]}, the model takes "
                              f"{visual.image_size[0]}x{visual.image_size[1]} (its position embedding is fixed)")
        if text.dim() != 2 or text.shape[1] != self.context:
            raise InputsError(f"{what}: text must be (B, {self.context}) token ids as its tokenizer returns, "
                              f"got shape {tuple(text.shape)}")
        img, txt = pairs(image.shape[0], text.shape[0], index, device)
        return {"pixel_values": image[img], "input_ids": text[txt], "_text_index": txt, "_grid": grid}

    def forward(self, feed: Dict[str, Any], method: Any) -> Tensor:
        """``logits_per_image``: logit_scale * image_features @ text_features.T (+ logit_bias),
        from the features and scale the model's forward returns."""
        out = self.model(feed["pixel_values"], feed["input_ids"])
        if isinstance(out, dict):
            image, text, scale, bias = (out["image_features"], out["text_features"], out["logit_scale"],
                                        out.get("logit_bias"))
        else:
            image, text, scale = out[:3]
            bias = out[3] if len(out) > 3 else None
        logits = scale * image @ text.T
        return logits if bias is None else logits + bias

    def score(self, feed, output, index):
        # pair b is (image b, text b) after prepare: its similarity is the diagonal
        one_hot = torch.eye(output.shape[0], dtype=output.dtype, device=output.device)
        return output, feed["_text_index"], one_hot

    def pooled_position(self, ids: Tensor) -> Tensor:
        """(B,) the token the text tower pools, by its own rule (open_clip ``text_global_pool``)."""
        B, T = ids.shape
        if self.pool_type == "argmax":
            return ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (ids == self.eos_id).int().argmax(dim=-1).long()
        return torch.full((B,), 0 if self.pool_type == "first" else T - 1, dtype=torch.long, device=ids.device)

    def streams(self, feed, cap):
        calls = [AttentionCall(r.name, r.probs, self.stream_of(r.name), self.stream_of(r.name)) for r in cap.records]
        image_calls = [c for c in calls if c.key == "image"]
        text_calls = [c for c in calls if c.key == "text"]
        ids = feed["input_ids"]
        B, T = ids.shape
        first = image_calls[0].probs
        n_img, dtype, device = first.shape[-1], first.dtype, ids.device
        if self.model.visual.pool_type == "avg":  # the mean of the patch tokens (x[:, 1:].mean)
            image_weights = torch.zeros(B, n_img, dtype=dtype, device=device)
            image_weights[:, 1:] = 1.0 / (n_img - 1)
        else:
            image_weights = one_hot_rows(B, n_img, 0, device, dtype)
        row = self.pooled_position(ids)
        pos = torch.arange(T, device=device)[None, :]
        real = pos <= row[:, None] if self.causal else torch.ones_like(ids, dtype=torch.bool)
        return image_text_streams(image_calls, text_calls, feed["_grid"], image_weights, row, real,
                                  self.settings.get("clip_convention", "hf") == "published")
