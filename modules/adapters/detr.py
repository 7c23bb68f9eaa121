"""DETR and Conditional DETR (encoder-decoder detectors), unmodified.

``transformers.DetrForObjectDetection`` and
``ConditionalDetrForObjectDetection`` as Hugging Face builds them.  Every
attention module of theirs (encoder ``self_attn``, decoder ``self_attn`` and
``encoder_attn``) returns ``(output, weights)``; in eager mode ``weights`` is
the probability tensor after softmax and (eval-mode, identity) dropout, the
tensor that multiplies the values, so a forward hook taking ``output[1]``
records it (METHODS_ICCV.md section 1: DETR's A is taken after dropout).
Conditional DETR's decoder cross-attention concatenates content and
conditional spatial parts of its queries and keys before the dot product; its
``weights`` are still one softmax over the image tokens per query, and the
same rules apply to them.

The trace (METHODS_ICCV.md section 4) is a :class:`~modules.trace.Coupled`
with two streams: ``"image"``, the h*w encoder tokens of the backbone's last
feature map (stride 32 for ResNet-50), and ``"query"``, the object queries.
Groups in forward order: every encoder self-attention (image), then per
decoder layer its self-attention (query) and its encoder-decoder attention
(query -> image).  The image mask is the ``pixel_mask`` downsampled exactly as
the model does it (read from the backbone's own output), so a padded batch
gives each sample's maps; the published code ignores ``key_padding_mask``.

Explained value: ``pred_logits[b, q, c]`` of the last decoder layer (a raw
logit).  ``index`` chooses it (see :func:`resolve_detection_index`); the
read-out is row q of R_qi on the (h, w) grid of the batch, padded cells 0.
The explained query of each sample is ``trace.coupled.outputs["image"]
.weights.argmax(1)`` (:func:`explained_queries`); ``Explanation.target`` is
the class.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from modules.adapters import CoupledLRP, InputsError, feed_dict, hf_class, model_device, one_hot_rows, register_adapter
from modules.adapters.hooks import HookAdapter
from modules.attention_capture import AttentionCapture, AttentionLayer
from modules.methods import Method
from modules.trace import AttentionCall, Coupled, Output, Trace

__all__ = ["DetrAdapter", "resolve_detection_index", "detection_probabilities", "explained_queries",
           "has_no_object_class"]

_CLASSES = ("DetrForObjectDetection", "ConditionalDetrForObjectDetection")


def has_no_object_class(model: nn.Module) -> bool:
    """True for DETR (softmax over the classes + a last "no object" class),
    False for Conditional DETR (sigmoid per class, no such class)."""
    return hf_class(model, ("ConditionalDetrForObjectDetection",)) is None


def detection_probabilities(logits: Tensor, no_object: bool) -> Tensor:
    """Per-query class probabilities over the object classes, (B, Q, C).

    DETR: softmax over all classes, the last ("no object") column dropped
    (METHODS_ICCV.md section 7, DETR's ``PostProcess``); Conditional DETR:
    sigmoid of each logit (its focal-loss head and post-processing).
    """
    return logits.softmax(-1)[..., :-1] if no_object else logits.sigmoid()


def _whole(t: Tensor, what: str) -> Tensor:
    if t.dtype == torch.bool or (t.is_floating_point() and not bool((t == t.round()).all())):
        raise ValueError(f"{what} {t.tolist()} is not a whole number")
    return t.long()


def resolve_detection_index(index: Any, logits: Tensor, no_object: bool) -> Tuple[Tensor, Tensor]:
    """The explained (query, class) of every sample, two (B,) long tensors.

    ``index``:

    * None: each sample's most confident query (largest probability over the
      object classes, :func:`detection_probabilities`) and its class;
    * an int, or a sequence / (B,) tensor of ints: the query (one for every
      sample, or one per sample); the class is the argmax of that query's
      logits over the object classes (DETR: the last, "no object", class
      excluded — METHODS_ICCV.md section 4);
    * a sequence of ``(query, class)`` pairs (one for every sample, or one
      per sample), or a (B, 2) / (1, 2) tensor: both given.
    """
    B, Q, C = logits.shape
    n_obj = C - 1 if no_object else C
    cls = None
    if index is None:
        probs = detection_probabilities(logits.detach(), no_object)
        queries = probs.amax(-1).argmax(-1)
    else:
        if isinstance(index, bool):
            raise ValueError(f"query index {index!r} is not a whole number")
        if hasattr(index, "__array__") and not isinstance(index, Tensor):  # numpy arrays: as tensors
            index = torch.as_tensor(index)
        pairs = (isinstance(index, Tensor) and index.dim() == 2) or \
            (not isinstance(index, Tensor) and isinstance(index, Sequence) and len(index) > 0
             and all(isinstance(i, (tuple, list)) for i in index))
        t = torch.as_tensor(index if isinstance(index, Tensor) else list(index) if isinstance(index, Sequence)
                            else index, device=logits.device)
        if pairs:
            if t.dim() != 2 or t.shape[1] != 2:
                raise ValueError(f"index pairs must be (query, class), got shape {tuple(t.shape)}")
            t = _whole(t, "index")
            queries, cls = t[:, 0], t[:, 1]
        else:
            queries = _whole(t.reshape(-1), "query index")
        if queries.numel() == 1:
            queries = queries.expand(B)
            cls = None if cls is None else cls.expand(B)
        if queries.numel() != B:
            raise ValueError(f"index holds {queries.numel()} queries for a batch of {B}")
        if bool(((queries < 0) | (queries >= Q)).any()):
            raise ValueError(f"query index {queries.tolist()} out of range: the model has {Q} queries (0..{Q - 1})")
    if cls is None:
        cls = logits.detach()[torch.arange(B, device=logits.device), queries, :n_obj].argmax(-1)
    elif bool(((cls < 0) | (cls >= C)).any()):
        raise ValueError(f"class index {cls.tolist()} out of range: the model has {C} classes (0..{C - 1})")
    return queries.contiguous(), cls.contiguous()


def explained_queries(trace: Trace) -> Tensor:
    """The query each sample's map explains, (B,) long."""
    return trace.coupled.outputs["image"].weights.argmax(dim=1)


@register_adapter
class DetrAdapter(CoupledLRP, HookAdapter):
    family = "Hugging Face DETR / Conditional DETR (unmodified)"
    examples = _CLASSES
    notes = ("encoder-decoder: the ICCV 2021 rules (METHODS_ICCV.md section 4); map (B, h, w) on the backbone's "
             "feature grid for one query; index = query or (query, class) per sample; transformer attribution, "
             "partial LRP and generic_attribution(use_lrp=True) through the LRP scope from the backbone's "
             "feature map up (rule set TA; the published DETR layers differ, README)")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._feature_mask: Optional[Tensor] = None
        self._queries: Optional[Tensor] = None
        self.no_object = has_no_object_class(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hf_class(model, _CLASSES) is not None

    # -- where the attention is ----------------------------------------------
    def _core(self) -> nn.Module:
        return self.model.model  # DetrModel / ConditionalDetrModel

    def attention_layers(self) -> List[AttentionLayer]:
        core = self._core()
        layers = []
        for i, layer in enumerate(core.encoder.layers):
            layers.append(AttentionLayer(f"model.encoder.layers.{i}.self_attn", layer.self_attn, layer.self_attn, 1))
        for i, layer in enumerate(core.decoder.layers):
            layers.append(AttentionLayer(f"model.decoder.layers.{i}.self_attn", layer.self_attn, layer.self_attn, 1))
            layers.append(AttentionLayer(f"model.decoder.layers.{i}.encoder_attn", layer.encoder_attn,
                                         layer.encoder_attn, 1, cross=True))
        return layers

    def depths(self) -> Dict[str, int]:
        return {}  # every layer takes part: no start layer

    @contextlib.contextmanager
    def recording(self, method: Method) -> Iterator[AttentionCapture]:
        """The attention capture, and a scoped hook on the backbone that keeps
        the feature map's mask the model itself computes from ``pixel_mask``."""
        def keep_mask(module, args, output) -> None:
            self._feature_mask = output[-1][1]  # (B, h, w) bool: the last feature map's mask

        with super().recording(method) as cap:
            handle = self._core().backbone.register_forward_hook(keep_mask)
            try:
                yield cap
            finally:
                handle.remove()

    # -- one call ------------------------------------------------------------
    def prepare(self, inputs: Any, index: Any) -> Dict[str, Any]:
        feed = feed_dict(inputs, "pixel_values", model_device(self.model))
        x = feed["pixel_values"]
        if x.dim() != 4:
            raise InputsError(f"{type(self.model).__name__}: pixel_values must be (B, C, H, W), got shape "
                              f"{tuple(x.shape)}")
        mask = feed.get("pixel_mask")
        if mask is None:
            feed["pixel_mask"] = torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.long, device=x.device)
        elif tuple(mask.shape) != (x.shape[0], *x.shape[-2:]):
            raise InputsError(f"pixel_mask {tuple(mask.shape)} does not match pixel_values {tuple(x.shape)}")
        elif not bool(mask.flatten(1).bool().any(dim=1).all()):
            raise InputsError("a sample has no pixel with pixel_mask = 1")
        keep = ("pixel_values", "pixel_mask")
        return {k: v for k, v in feed.items() if k in keep}

    def attach_input(self, feed: Dict[str, Any], stack: contextlib.ExitStack) -> None:
        """The LRP scope's explained inputs: the backbone's last feature map
        (the relevance pass needs nothing below the transformer; the
        backbone's batch norms and max pooling run as plain operations) and
        the decoder's all-zero input queries (so that the first decoder
        layer's attention is an activation, as the published relprop treats
        it: its values are v_proj(0) = the bias)."""
        leaves: Dict[str, Tensor] = {}
        feed["_leaf"] = leaves

        def feature_leaf(module, args, output):
            fmap, mask = output[-1]
            leaves["image"] = fmap.detach().requires_grad_(True)
            return list(output[:-1]) + [(leaves["image"], mask)]

        def query_leaf(module, args, kwargs):
            q = kwargs.get("inputs_embeds")
            if not isinstance(q, Tensor):
                raise RuntimeError(f"{type(self.model).__name__}: the decoder was called without inputs_embeds")
            leaves["query"] = q.detach().requires_grad_(True)
            return args, {**kwargs, "inputs_embeds": leaves["query"]}

        def boxes_constant(module, args, output):
            # the box head reaches no explained logit; Conditional DETR adds its reference points to it in
            # place (tmp[..., :2] += ...), an operation the scope refuses on an activation
            return output.detach()

        stack.callback(self._core().backbone.register_forward_hook(feature_leaf).remove)
        box_head = getattr(self.model, "bbox_predictor", None)
        if isinstance(box_head, nn.Module):
            stack.callback(box_head.register_forward_hook(boxes_constant).remove)
        stack.callback(self._core().decoder.register_forward_pre_hook(query_leaf, with_kwargs=True).remove)

    def forward(self, feed: Dict[str, Any], method: Method) -> Any:
        return self.model(**{k: v for k, v in feed.items() if not k.startswith("_")}, return_dict=True)

    def score(self, feed, output, index):
        """(logits of the explained query (B, C), class (B,), one-hot (B, C)):
        the score is ``pred_logits[b, q_b, c_b]``."""
        logits = output.logits
        queries, classes = resolve_detection_index(index, logits, self.no_object)
        self._queries = queries
        rows = logits[torch.arange(logits.shape[0], device=logits.device), queries]
        return rows, classes, torch.nn.functional.one_hot(classes, rows.shape[-1]).to(rows.dtype)

    def streams(self, feed, cap) -> Coupled:
        return self.coupled(self.calls_of(cap), self.feature_mask(), self._queries)

    # -- pieces explain_detections reuses ------------------------------------
    def feature_mask(self) -> Tensor:
        """(B, h, w) bool: the real cells of the last forward's feature map."""
        if self._feature_mask is None:
            raise RuntimeError(f"{type(self.model).__name__}: the backbone's feature mask was not recorded")
        return self._feature_mask

    def calls_of(self, cap: AttentionCapture) -> List[AttentionCall]:
        """The recorded calls with their streams, in forward order."""
        calls = []
        for r in cap.records:
            if ".encoder.layers." in r.name:
                calls.append(AttentionCall(r.name, r.probs, "image", "image"))
            elif r.name.endswith(".encoder_attn"):
                calls.append(AttentionCall(r.name, r.probs, "query", "image"))
            else:
                calls.append(AttentionCall(r.name, r.probs, "query", "query"))
        expected = len(self.layers)
        if len(calls) != expected:
            raise RuntimeError(f"{type(self.model).__name__}: recorded {len(calls)} attention maps for "
                               f"{expected} attention layers")
        return calls

    @staticmethod
    def coupled(calls: Sequence[AttentionCall], feature_mask: Tensor, queries: Tensor) -> Coupled:
        """The :class:`Coupled` trace of METHODS_ICCV.md section 4 from the
        calls (one group each), the (B, h, w) feature mask and the explained
        query of each sample (B,)."""
        B, h, w = feature_mask.shape
        first = calls[0].probs
        n_queries = next(c.probs.shape[-1] for c in calls if c.query == "query" and c.key == "query")
        if first.shape[-1] != h * w:
            raise RuntimeError(f"the encoder attends over {first.shape[-1]} tokens, not the {h}x{w} feature map")
        image_mask = feature_mask.reshape(B, h * w).bool()
        query_mask = torch.ones(B, n_queries, dtype=torch.bool, device=image_mask.device)
        weights = one_hot_rows(B, n_queries, queries, image_mask.device, first.dtype)
        outputs = {"image": Output("query", weights, "image", torch.ones_like(image_mask), grid=(h, w))}
        return Coupled([[c] for c in calls], {"image": h * w, "query": n_queries},
                       {"image": image_mask, "query": query_mask}, outputs)
