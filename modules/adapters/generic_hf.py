"""The generic path: Hugging Face classifiers that no adapter names (issue 26, item 1).

A Hugging Face ``*ForSequenceClassification``, ``*ForTokenClassification``
or ``*ForImageClassification`` built from the library's standard parts —
attention modules declared in ``_can_record_outputs["attentions"]`` (what
the dedicated adapters record too) — is explained without an adapter of
its own, by the dedicated text / image adapters' code with the explained
token found, not named:

* token heads: token t (``inputs["position"]``), as the text adapter;
Attention modules: those declared in ``_can_record_outputs["attentions"]``,
else (models written before transformers' output recorders: MPNet,
Data2VecVision) every outermost ``*Attention`` module whose forward takes
``output_attentions``, called with it inside the recording context.

* sequence / image heads: which tokens the head reads is read off the
  model's own code path — one gradient of the logits with respect to the
  last attention layer's probabilities: row i of that layer changes only
  token i's output, so its gradient is non-zero exactly for the tokens the
  head reads.  One token per sample: that token's row (token 0 for every
  sample: the [CLS] conventions of METHODS.md section 3 on text); every real
  token (text) or every patch token (image) with the config naming mean
  pooling (``use_mean_pooling``, ``classifier_pooling="mean"``): the mean of
  their rows.  Anything else is refused in one line naming what it found
  (never a guess) and asking for ``readout=``.

``explain(..., readout=...)`` names the read-out instead of finding it: a
token index (an int or one per sample, counted over the sample's real
tokens; 0 is [CLS] with its conventions) or ``"mean"``.

Where a dedicated adapter also applies (Hugging Face BERT, ViT, ...) it is
used; the generic path gives the same maps there (tested).
"""
from __future__ import annotations

import inspect
import sys
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from modules.adapters import UnsupportedModelError, register_adapter
from modules.adapters.hf_models import HFImageClassifierAdapter, HFTextClassifierAdapter
from modules.attention_capture import AttentionLayer, capture_attention, hf_attention_layers

__all__ = ["HFGenericTextAdapter", "HFGenericImageAdapter", "head_rows"]

_TEXT_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification")


def _output_attentions_layers(model: nn.Module) -> List[AttentionLayer]:
    """Models that declare no attention modules (written before transformers'
    output recorders: MPNet, Data2VecVision, ...): every outermost module named
    ``*Attention`` whose forward takes ``output_attentions``; inside the
    recording context it is called with ``output_attentions=True`` and returns
    (output, probabilities, ...)."""
    layers: List[AttentionLayer] = []
    for name, module in model.named_modules():
        if any(name.startswith(layer.name + ".") for layer in layers):
            continue
        if type(module).__name__.endswith("Attention") and \
                "output_attentions" in inspect.signature(module.forward).parameters:
            layers.append(AttentionLayer(name, module, module, 1, call_kwargs={"output_attentions": True}))
    return layers


def attention_layers_of(model: nn.Module) -> List[AttentionLayer]:
    """The declared attention modules, else the ``output_attentions`` ones."""
    return hf_attention_layers(model) or _output_attentions_layers(model)


def _generic_match(model: nn.Module, suffixes) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and type(model).__name__.endswith(suffixes) and \
        bool(attention_layers_of(model))


def head_rows(adapter: Any, feed: Dict[str, Any]) -> Tensor:
    """(B, N) bool: the tokens the head reads — where the gradient of the
    summed logits with respect to the last attention layer's probabilities
    is non-zero (one extra forward and backward pass, in the recording context)."""
    model = adapter.model
    with capture_attention(model, layers=adapter.layers, family="huggingface") as cap, torch.enable_grad():
        out = model(**adapter.model_kwargs(feed), return_dict=True)
        last = cap.records[-1].probs
        (grad,) = torch.autograd.grad(out.logits.sum(), last, allow_unused=True)
    if grad is None:
        raise UnsupportedModelError(f"{type(model).__name__}: the head does not depend on the last attention layer")
    return grad.detach().abs().sum(dim=(1, 3)) > 0


def _mean_pooling(config: Any) -> bool:
    return bool(getattr(config, "use_mean_pooling", False)) or getattr(config, "classifier_pooling", None) == "mean"


def _cannot_tell(model: nn.Module, rows: Tensor) -> UnsupportedModelError:
    counts = rows.sum(dim=1).tolist()
    return UnsupportedModelError(f"{type(model).__name__}: cannot tell which token the head reads (it depends on "
                                 f"{counts} tokens per sample and its config names no mean pooling): pass readout= "
                                 "(a token index, one per sample, or 'mean')")


class _Readout:
    """``explain(..., readout=)`` of the generic path: the read-out given, not found."""

    readout_given: Any = None

    def set_readout(self, readout: Any) -> None:
        if isinstance(readout, str) and readout != "mean":
            raise ValueError(f"readout={readout!r}: a token index (an int or one per sample) or 'mean'")
        self.readout_given = readout


@register_adapter
class HFGenericTextAdapter(_Readout, HFTextClassifierAdapter):
    fallback = True

    def attention_layers(self) -> List[AttentionLayer]:
        return attention_layers_of(self.model)
    family = "Hugging Face text classifiers, generic path (unmodified)"
    examples = ("any *ForSequenceClassification / *ForTokenClassification no adapter names, e.g. "
                "MPNetForSequenceClassification",)
    notes = ("no adapter of their own: the attention the model declares; the token the head reads found from "
             "the head's gradient at the last attention layer (one token: its row, [CLS] conventions at token 0; "
             "every real token with mean pooling in the config: the mean); token heads as above")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _generic_match(model, _TEXT_SUFFIXES)

    def __init__(self, model: nn.Module):
        super(HFTextClassifierAdapter, self).__init__(model)
        self.pooling = "token" if type(model).__name__.endswith("ForTokenClassification") else None

    def prepare(self, inputs, index):
        if self.pooling == "token":
            if self.readout_given is not None:
                raise ValueError(f"{type(self.model).__name__}: a token head reads token inputs['position'], "
                                 "not readout=")
            return super().prepare(inputs, index)
        self.pooling = "cls"  # position refused as for any sequence head; the rows are found below
        feed = super().prepare(inputs, index)
        real = feed["_real"]
        if self.readout_given is not None:
            from modules.adapters.generation import _contiguous_start, _positions

            if self.readout_given == "mean":
                self.pooling = "mean"
                return feed
            at = _contiguous_start(real, type(self.model).__name__) + _positions(
                self.readout_given, real.shape[0], real.sum(dim=1), "readout", real.device)
            self.pooling = "cls" if bool((at == 0).all()) else "row"
            feed["_rows"] = at
            return feed
        rows = head_rows(self, feed)
        if bool((rows.sum(dim=1) == 1).all()):
            at = rows.long().argmax(dim=1)
            self.pooling = "cls" if bool((at == 0).all()) else "row"
            feed["_rows"] = at
        elif torch.equal(rows, real) and _mean_pooling(self.model.config):
            self.pooling = "mean"
        else:
            raise _cannot_tell(self.model, rows)
        return feed


@register_adapter
class HFGenericImageAdapter(_Readout, HFImageClassifierAdapter):
    fallback = True

    def attention_layers(self) -> List[AttentionLayer]:
        return attention_layers_of(self.model)
    family = "Hugging Face image classifiers, generic path (unmodified)"
    examples = ("any *ForImageClassification no adapter names, e.g. Data2VecVisionForImageClassification",)
    notes = ("no adapter of their own: the token the head reads found from the head's gradient at the last "
             "attention layer ([CLS], or the patch tokens with mean pooling in the config)")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _generic_match(model, ("ForImageClassification",))

    def __init__(self, model: nn.Module):
        super(HFImageClassifierAdapter, self).__init__(model)
        self.prefix: Optional[int] = None
        self.pooling = "cls"

    def prepare(self, inputs, index):
        feed = super().prepare(inputs, index)
        gh, gw = feed["_grid"]
        if self.readout_given is not None:
            if self.readout_given == "mean":
                self.pooling = "mean"
            elif not isinstance(self.readout_given, str) and bool((torch.as_tensor(self.readout_given) == 0).all()):
                self.pooling = "cls"
            else:
                raise ValueError(f"{type(self.model).__name__}: readout={self.readout_given!r}: images take 0 "
                                 "([CLS]) or 'mean' (the patch tokens after one [CLS])")
            return feed
        rows = head_rows(self, feed)
        B, N = rows.shape
        self.prefix = N - gh * gw
        patches = torch.zeros_like(rows)
        patches[:, self.prefix:] = True
        if bool((rows.sum(dim=1) == 1).all()) and bool(rows[:, 0].all()):
            self.pooling = "cls"
        elif self.prefix == 1 and torch.equal(rows, patches) and _mean_pooling(self.model.config):
            self.pooling = "mean"
        else:
            raise _cannot_tell(self.model, rows)
        return feed

    def streams(self, feed, cap):
        if self.readout_given is not None:  # the prefix from the tokens attended over
            gh, gw = feed["_grid"]
            self.prefix = cap.records[0].probs.shape[-1] - gh * gw
            if self.pooling == "mean" and self.prefix != 1:
                raise ValueError(f"{type(self.model).__name__}: readout='mean' takes the patch tokens after one "
                                 f"[CLS]; this model has {self.prefix} prefix tokens")
        return super().streams(feed, cap)
