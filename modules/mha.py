"""``torch.nn.functional.multi_head_attention_forward`` written as explicit steps.

``nn.MultiheadAttention`` computes its attention in one fused call, so
neither its probabilities nor the steps between them are visible.
:func:`multi_head_attention` computes the same result (up to rounding) as
in-projections, ``q k^T``, the scale, the masks, the softmax, ``A v`` and
the out-projection, each a separate torch call made through ``op``, and
hands the (B, H, L, S) probabilities to ``record``.  The LRP scope
(:mod:`modules.lrp_scope`) routes ``multi_head_attention_forward`` here with
``op`` its rule table (as it decomposes ``scaled_dot_product_attention``);
the open_clip adapter runs it as the recording forward of every
``nn.MultiheadAttention`` (:func:`mha_module_forward`).

Masks follow ``nn.MultiheadAttention``: a boolean ``attn_mask`` /
``key_padding_mask`` is True where attention is *not* allowed, a float one
is added to the scores.  ``-inf`` entries of a float mask are applied as a
``masked_fill`` (a routing step) and only the finite rest is added, so a
relevance rule for the add never meets an infinite term.  ``bias_k``,
``bias_v``, ``add_zero_attn``, ``static_k`` / ``static_v`` and dropout in
training mode are refused through ``refuse``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["multi_head_attention", "mha_module_forward"]


def _call(func: Callable, *args: Any, **kwargs: Any) -> Any:
    return func(*args, **kwargs)


def _refuse(name: str, what: str) -> Any:
    raise ValueError(f"{what} is not supported: torch '{name}'")


def _split_mask(mask: Tensor, blocked: Optional[Tensor], additive: Optional[Tensor]
                ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Fold one mask (bool: True = blocked; float: added, ``-inf`` = blocked)
    into the blocked positions and the finite additive part."""
    if mask.dtype == torch.bool:
        block, add = mask, None
    else:
        block = torch.isneginf(mask)
        add = mask.masked_fill(block, 0.0)
        if not bool(add.any()):
            add = None
    blocked = block if blocked is None else blocked | block
    if add is not None:
        additive = add if additive is None else additive + add
    return blocked, additive


def multi_head_attention(query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int, num_heads: int,
                         in_proj_weight: Optional[Tensor], in_proj_bias: Optional[Tensor],
                         bias_k: Optional[Tensor], bias_v: Optional[Tensor], add_zero_attn: bool,
                         dropout_p: float, out_proj_weight: Tensor, out_proj_bias: Optional[Tensor],
                         training: bool = True, key_padding_mask: Optional[Tensor] = None,
                         need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                         use_separate_proj_weight: bool = False, q_proj_weight: Optional[Tensor] = None,
                         k_proj_weight: Optional[Tensor] = None, v_proj_weight: Optional[Tensor] = None,
                         static_k: Optional[Tensor] = None, static_v: Optional[Tensor] = None,
                         average_attn_weights: bool = True, is_causal: bool = False, *,
                         op: Callable = _call, record: Optional[Callable[[Tensor], None]] = None,
                         refuse: Callable[[str, str], Any] = _refuse) -> Tuple[Tensor, Optional[Tensor]]:
    """``F.multi_head_attention_forward`` (same arguments, sequence-first
    (L, B, E) or unbatched (L, E) inputs) as explicit steps; ``op(func, *args)``
    runs each computing step, ``record(probs)`` sees the (B, H, L, S)
    probabilities.  ``is_causal`` is a hint that ``attn_mask`` is causal (as
    in torch): the mask given is applied."""
    name = "multi_head_attention_forward"
    if bias_k is not None or bias_v is not None or add_zero_attn or static_k is not None or static_v is not None:
        return refuse(name, "attention with bias_k / bias_v / add_zero_attn / static_k / static_v")
    if training and dropout_p > 0:
        return refuse(name, "attention dropout (run in eval mode)")
    if is_causal and attn_mask is None:
        return refuse(name, "is_causal without the causal attn_mask")
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, B, E = query.shape
    S = key.shape[0]
    H = num_heads
    if E != embed_dim_to_check or E % H:
        return refuse(name, f"embedding size {E} (expected {embed_dim_to_check}, divisible by {H} heads)")
    d = E // H
    if use_separate_proj_weight:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        wq, wk, wv = in_proj_weight.chunk(3)
    bq, bk, bv = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
    q = op(F.linear, query, wq, bq).reshape(L, B, H, d).permute(1, 2, 0, 3)  # (B, H, L, d)
    k = op(F.linear, key, wk, bk).reshape(S, B, H, d).permute(1, 2, 0, 3)
    v = op(F.linear, value, wv, bv).reshape(S, B, H, d).permute(1, 2, 0, 3)
    blocked = additive = None
    if attn_mask is not None:
        mask = attn_mask.reshape(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.reshape(B, H, L, S)
        blocked, additive = _split_mask(mask, blocked, additive)
    if key_padding_mask is not None:
        blocked, additive = _split_mask(key_padding_mask.reshape(B, 1, 1, S), blocked, additive)
    scores = op(torch.matmul, q, k.transpose(-2, -1))
    scores = op(torch.mul, scores, d ** -0.5)
    if additive is not None:
        scores = op(torch.add, scores, additive.to(scores.dtype))
    if blocked is not None and bool(blocked.any()):
        scores = scores.masked_fill(blocked, float("-inf"))
    probs = op(torch.softmax, scores, -1)
    if record is not None:
        record(probs)
    out = op(torch.matmul, probs, v)  # (B, H, L, d)
    out = out.permute(2, 0, 1, 3).reshape(L, B, E)
    out = op(F.linear, out, out_proj_weight, out_proj_bias)
    weights = None
    if need_weights:
        weights = op(torch.mean, probs, 1) if average_attn_weights else probs
        if unbatched:
            weights = weights.squeeze(0)
    if unbatched:
        out = out.squeeze(1)
    return out, weights


def mha_module_forward(mha: nn.MultiheadAttention, record: Optional[Callable[[Tensor], None]], query: Tensor,
                       key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                       need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                       average_attn_weights: bool = True, is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """``nn.MultiheadAttention.forward`` with its attention explicit and the
    probabilities handed to ``record`` (a recording forward, see
    :class:`modules.attention_capture.AttentionLayer`)."""
    batched = query.dim() == 3
    if mha.batch_first and batched:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    out, weights = multi_head_attention(
        query, key, value, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, mha.bias_k,
        mha.bias_v, mha.add_zero_attn, mha.dropout, mha.out_proj.weight, mha.out_proj.bias, training=mha.training,
        key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
        use_separate_proj_weight=not mha._qkv_same_embed_dim, q_proj_weight=mha.q_proj_weight,
        k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight,
        average_attn_weights=average_attn_weights, is_causal=is_causal, record=record)
    if mha.batch_first and batched:
        out = out.transpose(0, 1)
    return out, weights
