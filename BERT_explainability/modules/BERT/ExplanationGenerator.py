"""Relevance per wordpiece for a BERT sequence classifier.

``explain(model, input_ids, attention_mask, method)`` implements every
method of ../shared/METHODS.md section 3 (the BERT conventions) for a padded
batch, on the inputs' device.  Method names and aliases come from
:mod:`modules.methods`.

Padding invariance: padded keys get attention probability exactly 0, so no
attention, gradient or relevance reaches a real token from a padded one.
Every reduction over the map (the minimum of transformer attribution's row,
attn_gradcam's gradient mean and min-max normalisation) runs over the
sample's real tokens only, and padded positions are returned as 0; so each
sample's map on its real tokens equals the map of that sample alone.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from modules.aggregation import add_identity, head_mean, positive_head_mean, rollout_row, row_normalize
from modules.methods import METHOD_CHOICES, METHOD_NAMES, Index, resolve_index, resolve_method
from modules.recording import record

__all__ = ["explain", "default_start_layer", "resolve_index", "METHOD_CHOICES", "METHOD_NAMES"]


def default_start_layer(method: str, num_layers: int) -> int:
    """First layer of the rollout when none is given (METHODS.md section 3):
    the last layer for ``transformer_attribution``, 0 otherwise."""
    return num_layers - 1 if resolve_method(method).name == "transformer_attribution" else 0


def _masked_min(x: Tensor, mask: Tensor) -> Tensor:
    """Per-sample minimum of ``x`` over the entries where ``mask`` is True, (B,)."""
    return x.masked_fill(~mask, float("inf")).flatten(1).amin(dim=1)


def _masked_minmax(x: Tensor, mask: Tensor) -> Tensor:
    """Per-sample min-max normalisation over the masked entries; a constant
    map becomes 0, entries outside the mask become 0."""
    lo = _masked_min(x, mask)
    hi = -_masked_min(-x, mask)
    shape = (-1,) + (1,) * (x.dim() - 1)
    span = (hi - lo).reshape(shape)
    out = torch.where(span > 0, (x - lo.reshape(shape)) / span.clamp(min=torch.finfo(x.dtype).tiny),
                      torch.zeros_like(x))
    return out.masked_fill(~mask, 0.0)


def explain(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, method: str = "transformer_attribution",
            index: Index = None, start_layer: Optional[int] = None, token_type_ids: Optional[Tensor] = None) -> Tensor:
    """Relevance of each wordpiece for class ``index`` (METHODS.md section 3).

    Parameters
    ----------
    model:
        A :class:`~BERT_explainability.modules.BERT.BertForSequenceClassification.BertForSequenceClassification`
        in eval mode.
    input_ids:
        (B, N) wordpiece ids, [CLS] first (padding on the right).
    attention_mask:
        (B, N), 1 for tokens and 0 for padding (None: no padding).
    method:
        A name from :data:`modules.methods.METHOD_CHOICES` (aliases included).
    index:
        None (each sample's predicted class), an int, or one class per sample.
    start_layer:
        First layer of the rollout of ``transformer_attribution`` (default:
        the last layer), ``generic_attribution`` and ``rollout`` (default 0).
    token_type_ids:
        (B, N) segment ids (default zeros).

    Returns
    -------
    Tensor
        (B, N) raw relevance per wordpiece; padded positions are 0.  With
        the published BERT conventions: ``transformer_attribution`` sets
        entry 0 ([CLS]) to the row's minimum; ``rollout``, ``attn_last_layer``,
        ``lrp_last_layer`` and ``lrp`` set entry 0 to 0; ``attn_gradcam`` is
        min-max normalised and has entry 0 set to 0; ``generic_attribution``
        returns row 0 unmodified.
    """
    m = resolve_method(method)
    depth = len(model.bert.encoder.layer)
    last = depth - 1
    s = default_start_layer(m.name, depth) if start_layer is None else int(start_layer)
    if not 0 <= s < depth:
        raise ValueError(f"start_layer={s} outside 0..{last}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, N), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match "
                         f"input_ids {tuple(input_ids.shape)}")
    real = attention_mask.bool()  # (B, N)
    if not bool(real.any(dim=1).all()):
        raise ValueError("a sample has no token with attention_mask = 1")

    def forward() -> Tensor:
        # the word embeddings as a leaf, so the attention maps have a graph
        # even when every parameter is frozen
        embeds = model.bert.embeddings.word_embeddings(input_ids).detach()
        if m.needs_grad:
            embeds.requires_grad_(True)
        return model(inputs_embeds=embeds, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    def relprop(R: Tensor, stop: Optional[int]) -> Optional[Tensor]:
        return model.relprop(R, stop_layer=stop)

    rec = record(m, forward, relprop, depth, s, index)
    attn, grads, rel, r_input = rec.attentions, rec.grads, rec.relevance, rec.input_relevance
    with torch.no_grad():
        if m.name == "transformer_attribution":
            mats = [row_normalize(add_identity(positive_head_mean(grads[i] * rel[i]))) for i in range(s, depth)]
            cam = rollout_row(mats, row=0)
            cam[:, 0] = _masked_min(cam, real)
        elif m.name == "generic_attribution":
            mats = [add_identity(positive_head_mean(grads[i] * attn[i])) for i in range(s, depth)]
            cam = rollout_row(mats, row=0)
        elif m.name == "rollout":
            mats = [row_normalize(add_identity(head_mean(attn[i]))) for i in range(s, depth)]
            cam = rollout_row(mats, row=0)
            cam[:, 0] = 0
        elif m.name == "attn_last_layer":
            cam = head_mean(attn[last])[:, 0].clone()
            cam[:, 0] = 0
        elif m.name == "attn_gradcam":
            pair = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, N, N): real rows x real columns
            n_pairs = pair.flatten(1).sum(dim=1).reshape(-1, 1, 1, 1)
            w = (grads[last] * pair).sum(dim=(2, 3), keepdim=True) / n_pairs  # (B, H, 1, 1)
            full = (w * attn[last]).mean(dim=1).clamp(min=0)  # (B, N, N)
            full = _masked_minmax(full, pair[:, 0])
            full[:, 0, 0] = 0
            cam = full[:, 0]
        elif m.name == "lrp_last_layer":
            cam = rel[last].clamp(min=0).mean(dim=1)[:, 0].clone()
            cam[:, 0] = 0
        elif m.name == "lrp":
            cam = r_input.sum(dim=-1)
            cam[:, 0] = 0
        else:  # pragma: no cover - the registry and this table move together
            raise NotImplementedError(m.name)
        cam = cam.masked_fill(~real, 0.0)
    return cam.detach()
