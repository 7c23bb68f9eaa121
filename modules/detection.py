"""Explaining every detection of DETR-style detectors, and masks from the explanations.

    from modules.detection import explain_detections, detection_masks
    dets = explain_detections(model, images, threshold=0.5)      # one Detections per image
    masks = detection_masks(dets[0])                              # (K, H0, W0) bool

* :func:`explain_detections` keeps, per image, the queries whose probability
  (max over the object classes; DETR: softmax without the "no object"
  class, Conditional DETR: sigmoid) exceeds ``threshold`` (METHODS_ICCV.md
  section 7, step 1) and explains each one's class logit
  ``pred_logits[b, q, c]`` with the engine's method (section 4).  One forward
  pass per image batch; the gradients of the K kept queries of an image are
  taken from that one graph (``strategy="retain"``: one backward per query
  with ``retain_graph``; ``"batched"``: the K backward passes vectorised with
  ``torch.autograd.grad(is_grads_batched=True)``; ``"repeat"``: the image
  repeated K times and one forward+backward of that batch).  Which is fastest
  is measured by ``benchmarks/iccv_speed.py``.
* :func:`masks_from_maps` is the published mask pipeline of METHODS_ICCV.md
  section 7 (min-max, x255, uint8 truncation, Otsu, -1 for queries not
  kept, bilinear upsampling to the padded input, value > 0, crop, nearest
  resize), a pure function; :func:`detection_masks` applies it to one
  image's :class:`Detections`.
* :func:`preprocess` is DETR's standard evaluation transform (shorter side
  800, longer at most 1333, ImageNet mean/std, zero padding with
  ``pixel_mask``) for PIL images, or a Hugging Face image processor's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.adapters import InputsError, adapter_for
from modules.adapters.detr import DetrAdapter, detection_probabilities
from modules.explain import explain_trace
from modules.methods import Method
from modules.trace import AttentionCall

__all__ = ["Detections", "explain_detections", "explain_queries", "masks_from_maps", "otsu_binarize",
           "detection_masks", "preprocess", "box_cxcywh_to_xyxy", "STRATEGIES", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRATEGIES = ("retain", "batched", "repeat")


@dataclass
class Detections:
    """The explained detections of one image.

    Attributes
    ----------
    queries, labels, scores:
        (K,) the kept queries, their class (argmax over the object classes)
        and probability.
    boxes:
        (K, 4) (cx, cy, w, h) normalised to the image, as the model returns them.
    boxes_xyxy:
        (K, 4) (x0, y0, x1, y1) in pixels of ``image_size``.
    maps:
        (K, h, w) each query's explanation on the batch's feature grid
        (cells outside this image's ``feature_mask`` are 0).
    feature_mask:
        (h, w) bool, the image's real cells of the feature grid.
    input_size:
        (H, W) of the padded model input (the batch's ``pixel_values``).
    unpadded_size:
        (H, W) of this image inside the input (its ``pixel_mask``).
    image_size:
        (H, W) of the original image (boxes and masks are given at it).
    """

    queries: Tensor
    labels: Tensor
    scores: Tensor
    boxes: Tensor
    boxes_xyxy: Tensor
    maps: Tensor
    feature_mask: Tensor
    input_size: Tuple[int, int]
    unpadded_size: Tuple[int, int]
    image_size: Tuple[int, int]


def box_cxcywh_to_xyxy(boxes: Tensor, size: Tuple[int, int]) -> Tensor:
    """(N, 4) normalised (cx, cy, w, h) -> (x0, y0, x1, y1) pixels of ``size`` = (H, W)."""
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    H, W = size
    return xyxy * torch.tensor([W, H, W, H], dtype=boxes.dtype, device=boxes.device)


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------
def _resized_size(w: int, h: int, shortest: int, longest: Optional[int]) -> Tuple[int, int]:
    """(H, W) of DETR's ``RandomResize([800], max_size=1333)`` (its
    ``get_size_with_aspect_ratio``)."""
    size = shortest
    if longest is not None:
        lo, hi = float(min(w, h)), float(max(w, h))
        if hi / lo * size > longest:
            size = int(round(longest * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def preprocess(images: Sequence[Any], processor: Any = None, shortest: int = 800,
               longest: Optional[int] = 1333) -> Tuple[Dict[str, Tensor], List[Tuple[int, int]]]:
    """Model inputs for PIL images and their original sizes (H, W).

    With a Hugging Face image ``processor``: its own transform.  Without:
    DETR's evaluation transform — bilinear resize so the shorter side is
    ``shortest`` and the longer at most ``longest``, [0, 1] scaling, ImageNet
    mean/std — then zero padding to the batch's largest size (bottom/right),
    with ``pixel_mask`` 1 on the image.
    """
    images = list(images)
    if not images:
        raise InputsError("no images given")
    sizes = [(img.height, img.width) for img in images]
    if processor is not None:
        feed = processor(images=[img.convert("RGB") for img in images], return_tensors="pt")
        out = {"pixel_values": feed["pixel_values"]}
        if "pixel_mask" in feed:
            out["pixel_mask"] = feed["pixel_mask"]
        return out, sizes
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tensors = []
    for img in images:
        h, w = _resized_size(img.width, img.height, shortest, longest)
        arr = np.asarray(img.convert("RGB").resize((w, h), resample=2), dtype=np.float32) / 255.0  # 2 = bilinear
        tensors.append((torch.from_numpy(arr).permute(2, 0, 1) - mean) / std)
    H = max(t.shape[1] for t in tensors)
    W = max(t.shape[2] for t in tensors)
    values = torch.zeros(len(tensors), 3, H, W)
    mask = torch.zeros(len(tensors), H, W, dtype=torch.long)
    for i, t in enumerate(tensors):
        values[i, :, :t.shape[1], :t.shape[2]] = t
        mask[i, :t.shape[1], :t.shape[2]] = 1
    return {"pixel_values": values, "pixel_mask": mask}, sizes


def _detr_adapter(model: nn.Module) -> DetrAdapter:
    adapter = adapter_for(model)
    if not isinstance(adapter, DetrAdapter):
        raise InputsError(f"{type(model).__name__} is no DETR detector (DetrForObjectDetection, "
                          "ConditionalDetrForObjectDetection)")
    return adapter


def _unpadded(pixel_mask: Tensor) -> Tuple[int, int]:
    real = pixel_mask.bool()
    return int(real.any(dim=1).sum()), int(real.any(dim=0).sum())


# --------------------------------------------------------------------------
# Explaining several queries of each image
# --------------------------------------------------------------------------
def _maps_from_graph(adapter: DetrAdapter, m: Method, calls: List[AttentionCall], feature_mask: Tensor,
                     logits: Tensor, b: int, queries: Tensor, classes: Tensor, strategy: str,
                     options: Dict[str, Any]) -> Tensor:
    """(K, h, w) maps of the queries of sample ``b``, all from one recorded forward pass."""
    K = queries.numel()
    grads: List[Optional[Tensor]] = [None] * len(calls)
    probs = [c.probs for c in calls]
    if m.needs_grad:
        if strategy == "batched":
            seed = torch.zeros(K, *logits.shape, dtype=logits.dtype, device=logits.device)
            seed[torch.arange(K), b, queries, classes] = 1.0
            got = torch.autograd.grad(logits, probs, grad_outputs=seed, retain_graph=True, allow_unused=True,
                                      is_grads_batched=True)
            grads = [None if g is None else g[:, b].detach() for g in got]
        else:
            per_query = []
            for q, c in zip(queries.tolist(), classes.tolist()):
                got = torch.autograd.grad(logits[b, q, c], probs, retain_graph=True, allow_unused=True)
                per_query.append([None if g is None else g[b].detach() for g in got])
            grads = [None if any(g[i] is None for g in per_query) else torch.stack([g[i] for g in per_query])
                     for i in range(len(calls))]
    one = []
    for call, g in zip(calls, grads):
        p = call.probs[b:b + 1].detach().expand(K, *call.probs.shape[1:])
        if m.needs_grad and g is None:
            g = torch.zeros_like(p)
        one.append(AttentionCall(call.name, p, call.query, call.key, grad=g))
    coupled = adapter.coupled(one, feature_mask[b:b + 1].expand(K, *feature_mask.shape[1:]), queries)
    with torch.no_grad():
        return m.compute_coupled(coupled, **options)["image"].detach()


def explain_queries(model: nn.Module, inputs: Any, queries: Sequence[Sequence[int]],
                    method: Union[str, Method] = "generic_attribution", classes: Optional[Sequence[Sequence[int]]] = None,
                    strategy: str = "retain", **options: Any) -> Tuple[List[Tensor], Any]:
    """Maps of chosen queries: ``queries[b]`` the queries of image b (classes
    ``classes[b]``, default each query's argmax over the object classes).

    Returns (one (K_b, h, w) tensor per image, the model output).  See the
    module docstring for ``strategy``.
    """
    maps, out = _explain(model, inputs, method, strategy, options, lambda out, probs: (
        [torch.as_tensor(list(q), dtype=torch.long, device=probs.device) for q in queries],
        None if classes is None else [torch.as_tensor(list(c), dtype=torch.long, device=probs.device)
                                      for c in classes]))[:2]
    return maps, out


def _explain(model, inputs, method, strategy, options, select):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    adapter = _detr_adapter(model)
    m = adapter.check_method(method, options)
    feed = adapter.prepare(inputs, None)
    B = feed["pixel_values"].shape[0]
    if strategy == "repeat":
        with adapter.recording(m), torch.no_grad():
            out = adapter.forward(feed, m)
            fmask = adapter.feature_mask()
        probs = detection_probabilities(out.logits, adapter.no_object)
        queries, classes = _selection(select(out, probs), probs, B)
        maps = []
        for b in range(B):
            K = queries[b].numel()
            if K == 0:
                maps.append(out.logits.new_zeros(0, *fmask.shape[1:]))
                continue
            one = {k: v[b:b + 1].expand(K, *v.shape[1:]) for k, v in feed.items()}
            index = torch.stack([queries[b], classes[b]], dim=1)
            maps.append(explain_trace(model, one, m, index=index, **options).maps)
        return maps, out, queries, classes, fmask
    with adapter.recording(m) as cap, torch.set_grad_enabled(m.needs_grad):
        out = adapter.forward(feed, m)
        logits = out.logits
        probs = detection_probabilities(logits.detach(), adapter.no_object)
        queries, classes = _selection(select(out, probs), probs, B)
        calls = adapter.calls_of(cap)
        fmask = adapter.feature_mask()
        if m.needs_grad and not logits.requires_grad:
            raise RuntimeError("the attention probabilities carry no autograd graph: run outside "
                               "torch.no_grad() / torch.inference_mode()")
        maps = []
        for b in range(B):
            if queries[b].numel() == 0:
                maps.append(logits.new_zeros(0, *fmask.shape[1:]).detach())
                continue
            maps.append(_maps_from_graph(adapter, m, calls, fmask, logits, b, queries[b], classes[b], strategy,
                                         options))
        out.logits = logits.detach()
        out.pred_boxes = out.pred_boxes.detach()
    return maps, out, queries, classes, fmask


def _selection(chosen, probs: Tensor, B: int) -> Tuple[List[Tensor], List[Tensor]]:
    queries, classes = chosen
    if len(queries) != B:
        raise ValueError(f"queries given for {len(queries)} images, the batch holds {B}")
    Q = probs.shape[1]
    if classes is None:
        classes = [probs[b, q].argmax(-1) if q.numel() else q for b, q in enumerate(queries)]
    for b, (q, c) in enumerate(zip(queries, classes)):
        if q.numel() and bool(((q < 0) | (q >= Q)).any()):
            raise ValueError(f"image {b}: query index {q.tolist()} out of range 0..{Q - 1}")
        if q.numel() != c.numel():
            raise ValueError(f"image {b}: {q.numel()} queries but {c.numel()} classes")
    return list(queries), list(classes)


def explain_detections(model: nn.Module, images_or_inputs: Any, threshold: float = 0.5,
                       method: Union[str, Method] = "generic_attribution", image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
                       processor: Any = None, strategy: str = "retain", **options: Any) -> List[Detections]:
    """Every detection of each image with its explanation (METHODS_ICCV.md sections 4, 7).

    Parameters
    ----------
    model:
        ``DetrForObjectDetection`` or ``ConditionalDetrForObjectDetection``
        (unmodified; left as found).
    images_or_inputs:
        PIL images (preprocessed by :func:`preprocess`, with ``processor`` if
        given), or the model's inputs: a (B, 3, H, W) tensor or a dict with
        ``pixel_values`` and ``pixel_mask`` (a padded batch).
    threshold:
        A query is kept when its probability, max over the object classes,
        is > ``threshold``.
    method:
        Any attention method (``generic_attribution``, ``rollout``,
        ``attn_last_layer``, ``attn_gradcam``); ``options`` are its options
        (``normalize``, ``self_in_rule_10``, ``nan_guard``).
    image_sizes:
        (H, W) of the original images (boxes and masks are given at these);
        default: the PIL images' sizes, else each image's unpadded input size.
    strategy:
        How the K gradients of an image are taken (module docstring).

    Returns
    -------
    list of :class:`Detections`, one per image, queries in increasing order.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    inputs = images_or_inputs
    if isinstance(inputs, (list, tuple)) and inputs and hasattr(inputs[0], "convert"):
        inputs, sizes = preprocess(inputs, processor)
        image_sizes = sizes if image_sizes is None else image_sizes

    def select(out, probs):
        keep = probs.amax(-1) > threshold
        return [keep[b].nonzero()[:, 0] for b in range(probs.shape[0])], None

    adapter = _detr_adapter(model)
    feed = adapter.prepare(inputs, None)
    pixel_mask = feed["pixel_mask"]
    B = pixel_mask.shape[0]
    if image_sizes is not None and len(image_sizes) != B:
        raise ValueError(f"{len(image_sizes)} image sizes for {B} images")
    maps, out, queries, classes, fmask = _explain(model, feed, method, strategy, options, select)
    probs = detection_probabilities(out.logits, adapter.no_object)
    input_size = tuple(feed["pixel_values"].shape[-2:])
    results = []
    for b in range(B):
        q, c = queries[b], classes[b]
        unpadded = _unpadded(pixel_mask[b])
        size = tuple(int(s) for s in image_sizes[b]) if image_sizes is not None else unpadded
        boxes = out.pred_boxes[b, q].detach()
        results.append(Detections(q.cpu(), c.cpu(), probs[b, q, c].detach().cpu(), boxes.cpu(),
                                  box_cxcywh_to_xyxy(boxes, size).cpu(), maps[b].cpu(), fmask[b].cpu(),
                                  input_size, unpadded, size))
    return results


# --------------------------------------------------------------------------
# Masks from explanations (METHODS_ICCV.md section 7)
# --------------------------------------------------------------------------
def otsu_binarize(cam: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Steps 2 of METHODS_ICCV.md section 7 for one (h, w) map: min-max
    normalise, x255, cast to uint8 (truncation), OpenCV Otsu
    (``THRESH_BINARY + THRESH_OTSU``); returns {0, 255} float32 (h, w).

    ``valid`` (h, w) bool restricts the normalisation and the histogram to
    an image's real cells in a padded batch (the rest is 0, background);
    a constant map gives an empty mask (the published code divides 0 by 0).
    """
    import cv2

    cam = cam.detach().float().cpu()
    valid = torch.ones_like(cam, dtype=torch.bool) if valid is None else valid.cpu().bool()
    vals = cam[valid]
    out = torch.zeros_like(cam)
    if vals.numel() == 0:
        return out
    lo, hi = vals.min(), vals.max()
    if not bool(hi > lo):
        return out
    scaled = ((vals - lo) / (hi - lo) * 255).numpy().astype(np.uint8)  # truncation, as the published code
    _, th = cv2.threshold(scaled.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    out[valid] = torch.from_numpy(th.reshape(-1).astype(np.float32))
    return out


def masks_from_maps(maps: Tensor, keep: Tensor, input_size: Tuple[int, int], unpadded_size: Tuple[int, int],
                    image_size: Tuple[int, int], valid: Optional[Tensor] = None) -> Tensor:
    """The published mask pipeline (METHODS_ICCV.md section 7, steps 2-3), pure.

    Parameters
    ----------
    maps:
        (Q, h, w) one explanation per query on the feature grid.
    keep:
        (Q,) bool, the queries kept (probability > threshold); the others
        get -1 everywhere, hence an empty mask.
    input_size, unpadded_size, image_size:
        (H, W) of the padded model input, of the image inside it, and of the
        original image.
    valid:
        (h, w) bool, the image's real cells (padded batches; default all).

    Returns
    -------
    (Q, *image_size) bool: Otsu per kept query ({0, 255}), bilinear
    (align_corners False) upsampling of all Q masks to ``input_size``,
    value > 0 (DETR's ``sigmoid > 0.5``), crop to ``unpadded_size``, nearest
    resize to ``image_size``.
    """
    Q, h, w = maps.shape
    keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
    if keep.numel() != Q:
        raise ValueError(f"keep holds {keep.numel()} flags for {Q} maps")
    if Q == 0:
        return torch.zeros(0, *image_size, dtype=torch.bool)
    cells = torch.full((1, Q, h, w), -1.0)
    for q in keep.nonzero()[:, 0].tolist():
        cells[0, q] = otsu_binarize(maps[q], valid)
    up = F.interpolate(cells, size=tuple(input_size), mode="bilinear", align_corners=False)
    fg = up[0, :, :unpadded_size[0], :unpadded_size[1]] > 0  # sigmoid(x) > 0.5
    out = F.interpolate(fg[None].float(), size=tuple(image_size), mode="nearest")[0]
    return out.bool()


def detection_masks(det: Detections) -> Tensor:
    """(K, H0, W0) bool masks of one image's detections (:func:`masks_from_maps`)."""
    K = det.maps.shape[0]
    return masks_from_maps(det.maps, torch.ones(K, dtype=torch.bool), det.input_size, det.unpadded_size,
                           det.image_size, det.feature_mask)
