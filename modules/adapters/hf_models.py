"""Adapters for Hugging Face transformers models, unmodified.

Attention is recorded at the modules each model declares in
``_can_record_outputs["attentions"]`` (their eager path returns the
probabilities that multiply the values), or, for models that declare none
(DeBERTa-v2), at the dropout module applied right after the softmax.
Inside the context every config asks for eager attention; everything is put
back on exit.

Which row is explained (METHODS.md sections 2, 3 and 8; beyond the papers
the definitions are the project's own):

* image classifiers: ViT and DeiT read [CLS] (DeiT with teacher: the
  averaged logits, still read at [CLS] as METHODS.md section 2 says); BEiT
  with mean pooling the mean of the patch rows; DINOv2 (+ registers), whose
  classifier reads the concatenation of [CLS] and the mean of the patch
  tokens, half the [CLS] row plus half the mean of the patch rows;
* text classifiers: the [CLS] row with the published BERT conventions
  (METHODS.md section 3) for BERT, RoBERTa, XLM-RoBERTa, DistilBERT, ALBERT,
  ELECTRA, DeBERTa-v2 and ModernBERT (``classifier_pooling="mean"``: the
  mean of the real tokens' rows); decoder-only classifiers (GPT-2, Llama,
  Qwen2) the row of the last non-padding token, found by the model's own rule;
  a single-output (``num_labels=1``, regression) head explains its output;
* token classifiers (``*ForTokenClassification`` of the same families): the
  logit of class c (``index``) at token t (``inputs["position"]``, counted
  over the sample's real tokens), read at row t with the text stream's
  conventions and t's own column kept (ours);
* CLIP and SigLIP: two streams (image, text); the explained value is
  ``logits_per_image`` of each (image, text) pair; CLIP's image map reads
  [CLS] and its text map the pooled EOS token; SigLIP's image map reads its
  attention-pooling head (a cross-attention from the probe), its text map
  the last token.  ``clip_convention="published"`` (an option of
  ``generic_attribution``) gives CLIP's maps as the published notebook
  computes them (METHODS_ICCV.md section 5): both towers from their last
  block, the text map the EOT row over columns 1..EOT-1 divided by their sum.

Image sizes: every size the model takes (``interpolate_pos_encoding=True``
in the inputs where the model needs it for sizes other than its config's).
The map is on the grid the model's own patch embedding gives (it floors a
size that is no multiple of the patch) and the read-out states the pixels
that grid covers (:func:`hf_patch_grid`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.adapters import (InputsError, UnsupportedModelError, check_text, column_mask, feed_dict, hf_class,
                              model_device, one_hot_rows, register_adapter)
from modules.adapters.hooks import HookAdapter
from modules.adapters.patch_grid import PatchGrid, patch_grid
from modules.attention_capture import AttentionLayer, dropout_after_softmax_layers, hf_attention_layers
from modules.methods import resolve_index
from modules.mha import mha_module_forward
from modules.trace import AttentionCall, Readout, Stream

__all__ = ["HFImageClassifierAdapter", "HFTextClassifierAdapter", "HFImageTextAdapter", "IMAGE_CLASSES",
           "TEXT_CLASSES", "IMAGE_TEXT_CLASSES", "clip_pooled_index", "image_text_streams", "check_clip_convention",
           "pairs", "hf_patch_grid"]

# class name -> (prefix tokens: int, or the config attribute holding the register count; pooling)
IMAGE_CLASSES: Dict[str, Tuple[Any, str]] = {
    "ViTForImageClassification": (1, "cls"),
    "DeiTForImageClassification": (2, "cls"),
    "DeiTForImageClassificationWithTeacher": (2, "cls"),
    "Dinov2ForImageClassification": (1, "cls+mean"),
    "Dinov2WithRegistersForImageClassification": ("num_register_tokens", "cls+mean"),
    "BeitForImageClassification": (1, "beit"),
}
# class name -> pooling ("cls", "last", "modernbert")
TEXT_CLASSES: Dict[str, str] = {
    "BertForSequenceClassification": "cls",
    "RobertaForSequenceClassification": "cls",
    "XLMRobertaForSequenceClassification": "cls",
    "DistilBertForSequenceClassification": "cls",
    "AlbertForSequenceClassification": "cls",
    "ElectraForSequenceClassification": "cls",
    "DebertaV2ForSequenceClassification": "cls",
    "ModernBertForSequenceClassification": "modernbert",
    "GPT2ForSequenceClassification": "last",
    "LlamaForSequenceClassification": "last",
    "Qwen2ForSequenceClassification": "last",
}
# token-level heads: the logit of class c at token t (inputs["position"]) reads row t
TEXT_CLASSES.update({f"{family}ForTokenClassification": "token" for family in (
    "Bert", "Roberta", "XLMRoberta", "DistilBert", "Albert", "Electra", "DebertaV2", "ModernBert", "GPT2", "Llama",
    "Qwen2")})
IMAGE_TEXT_CLASSES: Tuple[str, ...] = ("CLIPModel", "SiglipModel")


def _layers(model: nn.Module) -> List[AttentionLayer]:
    layers = hf_attention_layers(model) or []
    if not layers and hf_class(model, {"DebertaV2ForSequenceClassification",
                                         "DebertaV2ForTokenClassification"}):
        layers = dropout_after_softmax_layers(model, "DisentangledSelfAttention")
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__}: no attention modules found")
    return layers


def _albert_calls(model: nn.Module, layer: AttentionLayer) -> int:
    cfg = model.config
    return cfg.num_hidden_layers // max(cfg.num_hidden_groups, 1)


def hf_patch_grid(embeddings: Optional[nn.Module], patch: Any, images: Tensor, what: str) -> PatchGrid:
    """The token grid and its pixel extent of a Hugging Face vision model, read
    from its own patch embedding (:mod:`modules.adapters.patch_grid`):
    ``embeddings.patch_embeddings`` with its ``projection`` convolution (ViT,
    DeiT, BEiT, DINOv2, Data2VecVision, Swin: it floors, Swin pads; with
    ``interpolate_pos_encoding=True`` in the inputs ViT, DeiT and BEiT take
    other sizes than the config's, DINOv2 always does), or the
    ``patch_embedding`` convolution itself (CLIP, SigLIP)."""
    pe = getattr(embeddings, "patch_embeddings", None)
    proj = getattr(pe, "projection", None)
    if not isinstance(proj, nn.Conv2d):
        pe = proj = getattr(embeddings, "patch_embedding", None)
    return patch_grid(pe, proj, images, (patch, patch) if isinstance(patch, int) else tuple(patch), what)


class _HFAdapter(HookAdapter):
    library = "huggingface"

    def attention_layers(self) -> List[AttentionLayer]:
        return _layers(self.model)

    def calls_per_module(self, layer: AttentionLayer) -> int:
        if hf_class(self.model, {"AlbertForSequenceClassification", "AlbertForTokenClassification"}):
            return _albert_calls(self.model, layer)
        return 1

    def model_kwargs(self, feed: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in feed.items() if not k.startswith("_")}


@register_adapter
class HFImageClassifierAdapter(_HFAdapter):
    lrp = True  # every LRP method through the scope (modules.lrp_scope)
    family = "Hugging Face image classifiers (unmodified)"
    examples = tuple(IMAGE_CLASSES)
    notes = "BEiT mean pooling, DINOv2 [CLS]+mean: METHODS.md section 8 (ours)"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hf_class(model, IMAGE_CLASSES) is not None

    def __init__(self, model: nn.Module):
        super().__init__(model)
        prefix, self.pooling = IMAGE_CLASSES[hf_class(model, IMAGE_CLASSES)]
        self.prefix = prefix if isinstance(prefix, int) else 1 + int(getattr(model.config, prefix, 0) or 0)
        if self.pooling == "beit":
            self.pooling = "mean" if getattr(model.config, "use_mean_pooling", True) else "cls"

    def stream_of(self, name: str) -> str:
        return "image"

    def prepare(self, inputs, index):
        """The grid and its pixel extent as the model's own patch embedding
        gives them (:func:`hf_patch_grid`)."""
        feed = feed_dict(inputs, "pixel_values", model_device(self.model))
        embeddings = getattr(getattr(self.model, "base_model", None), "embeddings", None)
        feed["_grid"], feed["_extent"] = hf_patch_grid(embeddings, self.model.config.patch_size, feed["pixel_values"],
                                                       type(self.model).__name__)
        return feed

    def forward(self, feed, method):
        return self.model(**self.model_kwargs(feed), return_dict=True)

    def streams(self, feed, cap):
        calls = self.calls(cap)
        first = calls[0].probs
        B, N = first.shape[0], first.shape[-1]
        gh, gw = feed["_grid"]
        if N != self.prefix + gh * gw:
            raise RuntimeError(f"{type(self.model).__name__}: {N} tokens do not split into {self.prefix} prefix "
                               f"tokens and a {gh}x{gw} patch grid")
        device, dtype = first.device, first.dtype
        weights = one_hot_rows(B, N, 0, device, dtype)
        if self.pooling in ("mean", "cls+mean"):
            mean = torch.zeros_like(weights)
            mean[:, self.prefix if self.pooling == "cls+mean" else 1:] = 1.0
            mean = mean / mean.sum(dim=1, keepdim=True)
            weights = mean if self.pooling == "mean" else 0.5 * weights + 0.5 * mean
        readout = Readout(weights, column_mask(B, N, self.prefix, device), grid=(gh, gw),
                          pixel_extent=feed["_extent"])
        return {"image": Stream("image", calls, readout)}


@register_adapter
class HFTextClassifierAdapter(_HFAdapter):
    lrp = True  # every LRP method through the scope (modules.lrp_scope)
    family = "Hugging Face text classifiers (unmodified)"
    examples = tuple(TEXT_CLASSES)
    notes = ("[CLS] models: METHODS.md section 3 conventions; last-token and mean pooling: section 8 (ours); "
             "*ForTokenClassification: the logit of class index= at token inputs['position'], row t (ours); "
             "num_labels=1 (regression): the output")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hf_class(model, TEXT_CLASSES) is not None

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.pooling = TEXT_CLASSES[hf_class(model, TEXT_CLASSES)]
        if self.pooling == "modernbert":
            self.pooling = "cls" if getattr(model.config, "classifier_pooling", "cls") == "cls" else "mean"

    def stream_of(self, name: str) -> str:
        return "text"

    def prepare(self, inputs, index):
        """``inputs["position"]`` (token heads only): the token t whose logit is
        explained, an int or one per sample, counted over the sample's real
        tokens (0 = its first; left padding skipped)."""
        from modules.adapters.generation import _contiguous_start, _positions

        what = type(self.model).__name__
        position = inputs.get("position") if isinstance(inputs, Mapping) else None
        if isinstance(inputs, Mapping) and "position" in inputs:
            inputs = {k: v for k, v in inputs.items() if k != "position"}
        feed = feed_dict(inputs, "input_ids", model_device(self.model))
        real = feed["_real"] = check_text(feed, what)
        if self.pooling == "token":
            if position is None:
                raise InputsError(f"{what}: pass inputs['position'], the token whose logit is explained (an int or "
                                  "one per sample, counted over the sample's real tokens)")
            start = _contiguous_start(real, what)
            feed["_rows"] = start + _positions(position, real.shape[0], real.sum(dim=1), "position", real.device)
        elif position is not None:
            raise InputsError(f"{what}: position applies to token-classification heads; this head reads one pooled "
                              "token")
        return feed

    def score(self, feed, output, index):
        """Token heads: logits (B, C) at each sample's token t; else the model's logits (B, C)."""
        if self.pooling != "token":
            return super().score(feed, output, index)
        logits = output.logits
        at = logits[torch.arange(logits.shape[0], device=logits.device), feed["_rows"]]
        target = resolve_index(index, at)
        return at, target, F.one_hot(target, at.shape[-1]).to(at.dtype)

    def forward(self, feed, method):
        return self.model(**self.model_kwargs(feed), return_dict=True)

    def pooled_position(self, input_ids: Tensor) -> Tensor:
        """(B,) the position a decoder-only classifier reads, by the model's own
        rule: the last token that is not ``pad_token_id`` (the last position
        when the config has no pad token)."""
        pad = getattr(self.model.config, "pad_token_id", None)
        n = input_ids.shape[-1]
        if pad is None:
            return torch.full((input_ids.shape[0],), n - 1, dtype=torch.long, device=input_ids.device)
        non_pad = (input_ids != pad).int()
        return (torch.arange(n, device=input_ids.device) * non_pad).argmax(-1)

    def streams(self, feed, cap):
        calls = self.calls(cap)
        real = feed["_real"]
        B, N = real.shape
        dtype = calls[0].probs.dtype
        self_column = None
        if self.pooling == "cls":
            weights, self_column = one_hot_rows(B, N, 0, real.device, dtype), 0
        elif self.pooling == "mean":
            weights = real.to(dtype) / real.sum(dim=1, keepdim=True).to(dtype)
        elif self.pooling in ("token", "row"):  # token t's row (token heads; "row": the generic path's), column kept
            weights = one_hot_rows(B, N, feed["_rows"], real.device, dtype)
        else:
            weights = one_hot_rows(B, N, self.pooled_position(feed["input_ids"]), real.device, dtype)
        readout = Readout(weights, torch.ones_like(real), self_column=self_column, token_mask=real)
        return {"text": Stream("text", calls, readout, text_conventions=True)}


def clip_pooled_index(text_model: nn.Module, input_ids: Tensor) -> Tensor:
    """(B,) position of the token a Hugging Face ``CLIPTextModel`` pools (the
    EOS token), with the model's own rule: the highest token id when
    ``eos_token_id == 2`` (configs from before transformers PR #24773), else the
    first position of ``eos_token_id``."""
    ids = input_ids.to(torch.int)
    if text_model.eos_token_id == 2:
        return ids.argmax(dim=-1).long()
    return (ids == text_model.eos_token_id).int().argmax(dim=-1).long()


@register_adapter
class HFImageTextAdapter(_HFAdapter):
    lrp = True  # every LRP method through the scope (modules.lrp_scope)
    family = "Hugging Face image-text models (unmodified)"
    examples = IMAGE_TEXT_CLASSES
    notes = ("explains logits_per_image of each (image, text) pair; two maps (image, text); CLIP: "
             "clip_convention='published' (METHODS_ICCV.md section 5)")
    options = ("clip_convention",)

    def configure(self, **options) -> None:
        """``clip_convention``: ``"hf"`` (default: the pooled EOS row over every
        token, start layer 0) or ``"published"`` (the published notebook,
        METHODS_ICCV.md section 5); CLIPModel only."""
        check_clip_convention(options.get("clip_convention", "hf"), self.kind, self.kind == "CLIPModel")
        super().configure(**options)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hf_class(model, IMAGE_TEXT_CLASSES) is not None

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.kind = hf_class(model, IMAGE_TEXT_CLASSES)
        head = getattr(model.vision_model, "head", None) if self.kind == "SiglipModel" else None
        self.pool_head = head if isinstance(getattr(head, "attention", None), nn.MultiheadAttention) else None

    def attention_layers(self) -> List[AttentionLayer]:
        layers = [layer for layer in _layers(self.model) if layer.name.startswith(("vision_model.", "text_model."))]
        if self.pool_head is not None:
            mha = self.pool_head.attention
            layers.append(AttentionLayer("vision_model.head.attention", mha, mha, None, cross=True,
                                         forward=mha_module_forward))
        return layers

    def stream_of(self, name: str) -> str:
        return "image" if name.startswith("vision_model.") else "text"

    def prepare(self, inputs, index):
        if not isinstance(inputs, Mapping):
            raise InputsError(f"{self.kind} needs the dict its processor returns (pixel_values, input_ids)")
        feed = feed_dict(inputs, "pixel_values", model_device(self.model))
        if not isinstance(feed.get("input_ids"), Tensor):
            raise InputsError(f"inputs hold no 'input_ids': {self.kind} explains image-text pairs")
        img, txt = pairs(feed["pixel_values"].shape[0], feed["input_ids"].shape[0], index,
                          feed["pixel_values"].device)
        feed["pixel_values"] = feed["pixel_values"][img]
        for key in ("input_ids", "attention_mask", "position_ids"):
            if isinstance(feed.get(key), Tensor) and feed[key].dim() == 2:
                feed[key] = feed[key][txt]
        feed["_text_index"] = txt
        feed["_grid"], feed["_extent"] = hf_patch_grid(getattr(self.model.vision_model, "embeddings", None),
                                                       self.model.config.vision_config.patch_size,
                                                       feed["pixel_values"], self.kind)
        return feed

    def forward(self, feed, method):
        return self.model(**self.model_kwargs(feed), return_dict=True)

    def score(self, feed, output, index):
        # pair b is (image b, text b) after prepare; its similarity is the diagonal
        logits = output.logits_per_image
        one_hot = torch.eye(logits.shape[0], dtype=logits.dtype, device=logits.device)
        return logits, feed["_text_index"], one_hot

    def streams(self, feed, cap):
        calls = []
        for r in cap.records:
            if r.name == "vision_model.head.attention":
                calls.append(AttentionCall(r.name, r.probs, "pool", "image"))
            else:
                s = self.stream_of(r.name)
                calls.append(AttentionCall(r.name, r.probs, s, s))
        image_calls = [c for c in calls if c.key == "image"]
        text_calls = [c for c in calls if c.key == "text"]
        ids = feed["input_ids"]
        B, T = ids.shape
        dtype, device = image_calls[0].probs.dtype, ids.device
        n_img = image_calls[0].probs.shape[-1]
        if self.pool_head is not None:
            image_weights = torch.ones(B, 1, dtype=dtype, device=device)
        else:
            image_weights = one_hot_rows(B, n_img, 0, device, dtype)
        if self.kind == "CLIPModel":
            text_row = clip_pooled_index(self.model.text_model, ids)
        else:
            text_row = torch.full((B,), T - 1, dtype=torch.long, device=device)
        mask = feed.get("attention_mask")
        real = mask.bool() if isinstance(mask, Tensor) else torch.ones_like(ids, dtype=torch.bool)
        self.text_row = text_row
        return image_text_streams(image_calls, text_calls, feed["_grid"], image_weights, text_row, real,
                                  self.settings.get("clip_convention", "hf") == "published",
                                  pixel_extent=feed["_extent"])


CLIP_CONVENTIONS: Tuple[str, ...] = ("hf", "published")


def check_clip_convention(conv: Any, kind: str, applies: bool) -> None:
    """``clip_convention`` is one of :data:`CLIP_CONVENTIONS`; other than
    ``"hf"`` only where it ``applies`` (CLIP models)."""
    if conv not in CLIP_CONVENTIONS:
        raise ValueError(f"clip_convention={conv!r}: use one of {', '.join(CLIP_CONVENTIONS)}")
    if conv != "hf" and not applies:
        raise ValueError(f"clip_convention={conv!r} applies to CLIPModel only (and open_clip CLIP), not {kind}")


def image_text_streams(image_calls: List[AttentionCall], text_calls: List[AttentionCall], grid: Tuple[int, int],
                       image_weights: Tensor, text_row: Tensor, real: Tensor, published: bool,
                       pixel_extent: Optional[Tuple[int, int, int, int]] = None) -> Dict[str, Stream]:
    """The two streams of an image-text pair (Hugging Face CLIP / SigLIP,
    open_clip): the image read by ``image_weights`` over its tokens (the
    patch columns after the prefix on the ``grid``), the text by the pooled
    position ``text_row`` (B,), ``real`` (B, T) its real tokens; with
    ``published`` the CLIP notebook's convention (METHODS_ICCV.md section 5):
    both towers from their last block, text columns 1 .. EOT-1 divided by their sum;
    ``pixel_extent``: the pixels the image grid covers (:attr:`Readout.pixel_extent`)."""
    B, T = real.shape
    device, dtype = real.device, image_calls[0].probs.dtype
    n_img = image_calls[0].probs.shape[-1]
    gh, gw = grid
    start = "last" if published else None
    image = Stream("image", image_calls, Readout(image_weights, column_mask(B, n_img, n_img - gh * gw, device),
                                                  grid=(gh, gw), pixel_extent=pixel_extent), default_start=start)
    columns = torch.ones_like(real)
    if published:  # columns 1 .. EOT-1: SOT, EOT and what follows dropped
        pos = torch.arange(T, device=device)[None, :]
        columns = (pos >= 1) & (pos < text_row[:, None])
    text = Stream("text", text_calls, Readout(one_hot_rows(B, T, text_row, device, dtype), columns,
                                              token_mask=real, normalize="sum" if published else None),
                  default_start=start)
    return {"image": image, "text": text}


def pairs(n_images: int, n_texts: int, index: Any, device: torch.device) -> Tuple[Tensor, Tensor]:
    """(image, text) index of every explained pair: image i with text i by
    default (one image or one text is paired with every text or image);
    ``index`` names the text for each image."""
    if index is not None:
        texts = resolve_index(index, torch.zeros(n_images, n_texts, device=device), what="text")
        return torch.arange(n_images, device=device), texts
    if n_images == n_texts:
        return torch.arange(n_images, device=device), torch.arange(n_texts, device=device)
    if n_images == 1:
        return torch.zeros(n_texts, dtype=torch.long, device=device), torch.arange(n_texts, device=device)
    if n_texts == 1:
        return torch.arange(n_images, device=device), torch.zeros(n_images, dtype=torch.long, device=device)
    raise InputsError(f"image-text models explain (image i, text i) pairs: got {n_images} images and {n_texts} "
                      "texts; pass index= (the text for each image)")
