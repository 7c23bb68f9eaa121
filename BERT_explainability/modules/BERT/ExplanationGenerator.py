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

from torch import Tensor

from modules.explain import explain as _explain
from modules.aggregation import masked_min, masked_minmax
from modules.methods import METHOD_CHOICES, METHOD_NAMES, Index, resolve_index, resolve_method

__all__ = ["explain", "default_start_layer", "resolve_index", "METHOD_CHOICES", "METHOD_NAMES"]


def default_start_layer(method: str, num_layers: int) -> int:
    """First layer of the rollout when none is given (METHODS.md section 3):
    the last layer for ``transformer_attribution``, 0 otherwise."""
    return num_layers - 1 if resolve_method(method).text_start == "last" else 0


_masked_min = masked_min  # kept for code that imported the private names
_masked_minmax = masked_minmax


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
    inputs = {"input_ids": input_ids}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    return _explain(model, inputs, method, index=index, start_layer=start_layer)
