"""Single-stream vision-language models, unmodified: VisualBERT and ViLT.

Both run one self-attention stack over the joint sequence [text tokens,
then the image tokens], so their explanation is a single
:class:`~modules.trace.Stream` (the self-attention rule over the joint
sequence, METHODS_ICCV.md section 3; METHODS.md section 8) whose explained
row is read twice: the text columns give ``.text`` and the image columns
``.image`` (:class:`~modules.trace.Part`), so :func:`modules.explain.explain`
returns a ``StreamMaps(image, text)``.

**VisualBERT** (``transformers.VisualBertForQuestionAnswering``).  The
joint sequence is [T text tokens (padding included, where the tokenizer put
it), I visual embeddings].  The QA head pools the output token at
``attention_mask.sum(1) - 2`` of the joint sequence (transformers 5 copies
MMF's ``pooler_strategy: vqa``: with right padding that is the last question
token before [SEP], usually "?"), not [CLS]; that row is explained.  The
only difference from MMF (METHODS_ICCV.md section 3) is that MMF removes
text padding from the sequence while transformers keeps it (masked): the
same row and the same columns per sample.  Text map (B, T): columns
1 .. pooled-1 (MMF's; [CLS], the pooled token, [SEP] and padding read 0);
image map (B, I): one value per visual embedding (padded ones 0).  Left
padding is refused (the model would pool a padding token).

**ViLT** (``transformers.ViltForQuestionAnswering``).  The joint sequence
is [T text tokens, the image [CLS] token, n patch tokens]; the pooler reads
joint token 0 (the text [CLS]); that row is explained.  ViLT's embeddings
may reorder and subsample the patches (``visual_embed`` draws them with
``torch.multinomial``: with ``max_image_length=-1`` every valid patch, in a
random order); the adapter records the ``patch_index`` the embeddings
return (a scoped wrapper of ``visual_embed``, removed on exit) and puts each
patch token's relevance back at its grid cell.  ``pixel_mask`` (images of
different sizes padded into one batch) is handled: the grid (B, gh, gw) is
the padded batch's, cells outside a sample's image (and patches the model
did not sample) read 0.  Text map (B, T): columns 1 .. L-2 of the L real
tokens ([CLS] question [SEP] as the ViLT processor builds it; [CLS] - the
pooled token - and [SEP] read 0); image map (B, gh, gw): the patch columns;
the image [CLS] column is a column of its own and is dropped.

Method conventions (METHODS_ICCV.md section 3, VisualBERT's published
generator; the project applies them to ViLT too): ``generic_attribution``
R = I, R <- R + Abar R over every layer, the pooled row; ``rollout`` the
product of (A + I) **without** row normalisation; ``attn_last_layer`` the head
mean of the last layer, the pooled row; ``attn_gradcam`` w_h = mean of G_h
over the (real) N x N map, clamp after the head mean, min-max over the whole
map, then the pooled row (no further normalisation).  They are stream flags
(``text_conventions=True``, ``rollout_row_normalize=False``), read by the
methods of :mod:`modules.methods`.

The LRP rows run through the LRP scope (:mod:`modules.lrp_scope`) on the
unmodified model with rule set TA (the published ``BERT_ours`` is built
from ``layers_ours``): ``transformer_attribution`` the rollout over every
layer (start 0) of (mean_h max(G * R_A, 0) + I) **without** row
normalisation (the published generator's one ``compute_rollout_attention``),
the pooled row; ``lrp_last_layer`` the head mean of the last layer's
**signed** R_A, min-max over the whole map of real tokens, the pooled row
(``generate_partial_lrp``); ``generic_attribution`` with ``use_lrp=True``
("ours with LRP") A replaced by R_A, the gradient still multiplied.  The
relevance pass starts at the explained logit (value 1) and reaches the
attention of every layer it needs; the scope starts at the joint
sequence the embeddings return (their in-place ``+=`` has no rule).  For ViLT
all of this is the project's extension, not published code.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List

import torch
from torch import Tensor, nn

from modules.adapters import CoupledLRP, InputsError, UnsupportedModelError, feed_dict, hf_class, model_device, \
    one_hot_rows, register_adapter
from modules.adapters.hooks import HookAdapter
from modules.attention_capture import AttentionCapture, AttentionLayer, dropout_after_softmax_layers
from modules.methods import Method
from modules.trace import Part, Readout, Stream

__all__ = ["VisualBertAdapter", "ViltAdapter", "visualbert_pooled_index", "text_positions"]


def _self_attention_layers(model: nn.Module, class_name: str) -> List[AttentionLayer]:
    """Every ``class_name`` module, recorded at its ``dropout`` (right after the softmax)."""
    layers = dropout_after_softmax_layers(model, class_name)
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__}: no {class_name} modules found")
    return layers


def _text_feed(feed: Dict[str, Any], what: str) -> Tensor:
    """Check ``input_ids`` (B, T) / ``attention_mask`` (default ones, made
    long); the (B, T) bool mask of real tokens."""
    ids = feed.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise InputsError(f"{what} needs input_ids of shape (B, T)")
    if feed.get("inputs_embeds") is not None:
        raise InputsError(f"{what}: pass input_ids, not inputs_embeds")
    mask = feed.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        raise InputsError(f"{what}: attention_mask must have the shape of input_ids {tuple(ids.shape)}")
    feed["attention_mask"] = mask.long()
    real = mask.bool()
    lengths = real.sum(dim=1)
    if bool((lengths < 2).any()):
        raise InputsError(f"{what}: every text needs at least 2 real tokens ([CLS] ... [SEP])")
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
    if not torch.equal(real, pos < lengths[:, None]):
        raise InputsError(f"{what}: pad the text on the right (attention_mask 1s first)")
    return real


def text_positions(real: Tensor, first: int, stop: Tensor, total: int) -> Tensor:
    """(B, total) long: column p -> p for ``first <= p < stop[b]`` (a real
    text token), -1 elsewhere (the text part of a joint row)."""
    B, T = real.shape
    pos = torch.arange(total, device=real.device)[None, :].expand(B, total)
    keep = (pos >= first) & (pos < stop[:, None]) & (pos < T)
    keep[:, :T] &= real
    return torch.where(keep, pos, torch.full_like(pos, -1))


def visualbert_pooled_index(attention_mask: Tensor) -> Tensor:
    """(B,) the joint position ``VisualBertForQuestionAnswering`` pools:
    ``attention_mask.sum(1) - 2``, its own rule (METHODS_ICCV.md section 3)."""
    return attention_mask.long().sum(dim=1) - 2


@register_adapter
class VisualBertAdapter(CoupledLRP, HookAdapter):
    family = "Hugging Face VisualBERT VQA (unmodified)"
    examples = ("VisualBertForQuestionAnswering",)
    notes = ("single stream: the row the QA head pools (attention_mask.sum - 2), METHODS_ICCV.md section 3 "
             "conventions; maps .text (B, T), .image (B, boxes); transformer attribution, partial LRP and "
             "generic_attribution(use_lrp=True) through the LRP scope (rule set TA, as the published layers)")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hf_class(model, ("VisualBertForQuestionAnswering",)) is not None

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if getattr(model.config, "bypass_transformer", False):
            raise UnsupportedModelError("VisualBERT with bypass_transformer=True (text-only encoder, one extra "
                                        "layer) is not supported")

    def attention_layers(self) -> List[AttentionLayer]:
        return _self_attention_layers(self.model, "VisualBertSelfAttention")

    def stream_of(self, name: str) -> str:
        return "joint"

    def prepare(self, inputs: Any, index: Any) -> Dict[str, Any]:
        what = "VisualBERT"
        if not isinstance(inputs, Mapping):
            raise InputsError(f"{what} needs a dict: input_ids, attention_mask, visual_embeds (B, boxes, dim)")
        feed = feed_dict(inputs, "input_ids", model_device(self.model))
        real = _text_feed(feed, what)
        vis = feed.get("visual_embeds")
        B = real.shape[0]
        if not isinstance(vis, Tensor) or vis.dim() != 3 or vis.shape[0] != B:
            raise InputsError(f"{what} needs visual_embeds of shape (B={B}, boxes, dim)")
        if vis.shape[-1] != self.model.config.visual_embedding_dim:
            raise InputsError(f"{what}: visual_embeds have {vis.shape[-1]} features, the model expects "
                              f"{self.model.config.visual_embedding_dim}")
        vmask = feed.get("visual_attention_mask")
        if vmask is None:
            vmask = torch.ones(vis.shape[:2], dtype=torch.long, device=vis.device)
        if not isinstance(vmask, Tensor) or vmask.shape != vis.shape[:2]:
            raise InputsError(f"{what}: visual_attention_mask must be (B, boxes) = {tuple(vis.shape[:2])}")
        feed["visual_attention_mask"] = vmask.long()
        feed["_real"] = real
        return feed

    def attach_input(self, feed, stack) -> None:
        """The LRP scope starts at the joint sequence the embeddings return
        (text and visual tokens, the encoder's input): the LRP rows need
        relevance down to the first attention layer only, and the
        embeddings' in-place ``+=`` has no rule (``add_``)."""
        leaves = feed["_leaf"] = {}

        def make_leaf(module, args, output):
            leaves["joint"] = output.detach().requires_grad_(True)
            return leaves["joint"]

        stack.callback(self.model.visual_bert.embeddings.register_forward_hook(make_leaf).remove)

    def forward(self, feed: Dict[str, Any], method: Method) -> Any:
        return self.model(**{k: v for k, v in feed.items() if not k.startswith("_")}, return_dict=True)

    def streams(self, feed: Dict[str, Any], cap: AttentionCapture) -> Dict[str, Stream]:
        calls = self.calls(cap)
        real = feed["_real"]
        vreal = feed["visual_attention_mask"].bool()
        B, T = real.shape
        I = vreal.shape[1]
        N = T + I
        if calls[0].probs.shape[-1] != N:
            raise RuntimeError(f"VisualBERT attended over {calls[0].probs.shape[-1]} tokens, expected {T} + {I}")
        device, dtype = real.device, calls[0].probs.dtype
        pooled = visualbert_pooled_index(feed["attention_mask"])
        text = text_positions(real, 1, pooled, N)  # MMF: columns 1 .. cls_index-1
        image = torch.full((B, N), -1, dtype=torch.long, device=device)
        boxes = torch.arange(I, device=device)[None, :].expand(B, I)
        image[:, T:] = torch.where(vreal, boxes, torch.full_like(boxes, -1))
        readout = Readout(one_hot_rows(B, N, pooled, device, dtype), (text >= 0) | (image >= 0),
                          token_mask=torch.cat([real, vreal], dim=1),
                          parts={"text": Part(text, (T,)),
                                 "image": Part(image, (I,))})
        return {"joint": Stream("joint", calls, readout, text_conventions=True, rollout_row_normalize=False,
                                default_start="first", partial_lrp_minmax=True)}


@register_adapter
class ViltAdapter(CoupledLRP, HookAdapter):
    family = "Hugging Face ViLT VQA (unmodified)"
    examples = ("ViltForQuestionAnswering",)
    notes = ("single stream: the text [CLS] row (joint token 0), METHODS_ICCV.md section 3 conventions (ours for "
             "ViLT); maps .text (B, T), .image (B, gh, gw); pixel_mask handled; transformer attribution, partial "
             "LRP and generic_attribution(use_lrp=True) through the LRP scope (rule set TA; ours)")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hf_class(model, ("ViltForQuestionAnswering",)) is not None

    def attention_layers(self) -> List[AttentionLayer]:
        return _self_attention_layers(self.model, "ViltSelfAttention")

    def stream_of(self, name: str) -> str:
        return "joint"

    def prepare(self, inputs: Any, index: Any) -> Dict[str, Any]:
        what = "ViLT"
        if not isinstance(inputs, Mapping):
            raise InputsError(f"{what} needs the dict its processor returns: input_ids, attention_mask, "
                              "pixel_values, pixel_mask")
        feed = feed_dict(inputs, "input_ids", model_device(self.model))
        if feed.get("image_embeds") is not None:
            raise InputsError(f"{what}: pass pixel_values, not image_embeds")
        real = _text_feed(feed, what)
        pix = feed.get("pixel_values")
        B = real.shape[0]
        cfg = self.model.config
        if not isinstance(pix, Tensor) or pix.dim() != 4 or pix.shape[0] != B or pix.shape[1] != cfg.num_channels:
            raise InputsError(f"{what} needs pixel_values of shape (B={B}, {cfg.num_channels}, H, W)")
        H, W = pix.shape[-2:]
        p = cfg.patch_size
        if H % p or W % p:
            raise InputsError(f"{what}: image size {H}x{W} is not a multiple of the patch size {p}")
        pmask = feed.get("pixel_mask")
        if pmask is None:
            pmask = torch.ones(B, H, W, dtype=torch.long, device=pix.device)
        if not isinstance(pmask, Tensor) or pmask.shape != (B, H, W):
            raise InputsError(f"{what}: pixel_mask must be (B, H, W) = {(B, H, W)}")
        if not bool(pmask.flatten(1).any(dim=1).all()):
            raise InputsError(f"{what}: a sample's pixel_mask is all 0")
        feed["pixel_mask"] = pmask.long()
        feed["_real"] = real
        return feed

    @contextlib.contextmanager
    def recording(self, method: Method) -> Iterator[AttentionCapture]:
        """The attention hooks, and a scoped wrapper of the embeddings'
        ``visual_embed`` that keeps its ``(x, x_mask, (patch_index, (gh, gw)))``."""
        emb = self.model.vilt.embeddings
        had = "visual_embed" in vars(emb)
        original = emb.visual_embed
        self._visual: List[Any] = []

        def visual_embed(*args, **kwargs):
            out = original(*args, **kwargs)
            self._visual.append(out)
            return out

        emb.visual_embed = visual_embed
        try:
            with super().recording(method) as cap:
                yield cap
        finally:
            if had:
                emb.visual_embed = original
            else:
                del emb.visual_embed

    def attach_input(self, feed, stack) -> None:
        """The LRP scope starts at the joint sequence the embeddings return
        (as VisualBERT's): the text embeddings' in-place ``+=`` has no rule."""
        leaves = feed["_leaf"] = {}

        def make_leaf(module, args, output):
            leaves["joint"] = output[0].detach().requires_grad_(True)
            return (leaves["joint"],) + tuple(output[1:])

        stack.callback(self.model.vilt.embeddings.register_forward_hook(make_leaf).remove)

    def forward(self, feed: Dict[str, Any], method: Method) -> Any:
        return self.model(**{k: v for k, v in feed.items() if not k.startswith("_")}, return_dict=True)

    def streams(self, feed: Dict[str, Any], cap: AttentionCapture) -> Dict[str, Stream]:
        calls = self.calls(cap)
        if len(self._visual) != 1:
            raise RuntimeError(f"ViLT: visual_embed ran {len(self._visual)} times in one forward pass")
        _, x_mask, (patch_index, (gh, gw)) = self._visual[0]
        real = feed["_real"]
        B, T = real.shape
        n = patch_index.shape[1]
        N = T + 1 + n
        if calls[0].probs.shape[-1] != N:
            raise RuntimeError(f"ViLT attended over {calls[0].probs.shape[-1]} tokens, expected {T} + 1 + {n}")
        device, dtype = real.device, calls[0].probs.dtype
        seen = x_mask[:, 1:].bool().to(device)  # real patches (x_mask[:, 0] is the image [CLS])
        cells = (patch_index[..., 0] * gw + patch_index[..., 1]).long().to(device)
        image = torch.full((B, N), -1, dtype=torch.long, device=device)
        image[:, T + 1:] = torch.where(seen, cells, torch.full_like(cells, -1))
        text = text_positions(real, 1, real.sum(dim=1) - 1, N)  # [CLS] and [SEP] dropped
        token_mask = torch.cat([real, x_mask.bool().to(device)], dim=1)
        readout = Readout(one_hot_rows(B, N, 0, device, dtype), (text >= 0) | (image >= 0), token_mask=token_mask,
                          parts={"text": Part(text, (T,)), "image": Part(image, (int(gh), int(gw)))})
        return {"joint": Stream("joint", calls, readout, text_conventions=True, rollout_row_normalize=False,
                                default_start="first", partial_lrp_minmax=True)}
